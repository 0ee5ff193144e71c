"""dalle_jax/tensorboard.py: event files that a hand-written reader and TensorBoard both read back.

The reader here is independent of the writer: its own bit-by-bit CRC32C and a generic protobuf
wire-format decoder, so a mistake in the writer's tables or field numbers cannot cancel out.
"""

import glob
import math
import os
import struct

import numpy as np
import pytest

from dalle_jax import tensorboard


def _crc32c_bitwise(data: bytes) -> int:
  crc = 0xFFFFFFFF
  for byte in data:
    crc ^= byte
    for _ in range(8):
      crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
  return crc ^ 0xFFFFFFFF


def _masked(data: bytes) -> int:
  crc = _crc32c_bitwise(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
  value, shift = 0, 0
  while True:
    byte = data[pos]
    pos += 1
    value |= (byte & 0x7F) << shift
    shift += 7
    if not byte & 0x80:
      return value, pos


def _fields(data: bytes) -> list[tuple[int, int, object]]:
  """Protobuf wire format -> [(field number, wire type, raw value)]."""
  out, pos = [], 0
  while pos < len(data):
    key, pos = _read_varint(data, pos)
    field, wire = key >> 3, key & 7
    if wire == 0:
      value, pos = _read_varint(data, pos)
    elif wire == 1:
      value, pos = data[pos:pos + 8], pos + 8
    elif wire == 5:
      value, pos = data[pos:pos + 4], pos + 4
    elif wire == 2:
      length, pos = _read_varint(data, pos)
      value, pos = data[pos:pos + length], pos + length
    else:
      raise AssertionError(f"unexpected wire type {wire}")
    out.append((field, wire, value))
  assert pos == len(data)
  return out


def _read_records(path: str) -> list[bytes]:
  """TFRecord framing, both checksums verified."""
  with open(path, "rb") as f:
    data = f.read()
  records, pos = [], 0
  while pos < len(data):
    length_bytes = data[pos:pos + 8]
    (length,) = struct.unpack("<Q", length_bytes)
    (length_crc,) = struct.unpack("<I", data[pos + 8:pos + 12])
    assert length_crc == _masked(length_bytes)
    record = data[pos + 12:pos + 12 + length]
    (data_crc,) = struct.unpack("<I", data[pos + 12 + length:pos + 16 + length])
    assert data_crc == _masked(record)
    records.append(record)
    pos += 16 + length
  assert pos == len(data)
  return records


def _decode_event(record: bytes) -> dict:
  """Event bytes -> {"wall_time", "step", "file_version"?, "values"?: [(tag, float)]}."""
  event = {"step": 0}
  for field, wire, value in _fields(record):
    if (field, wire) == (1, 1):
      event["wall_time"] = struct.unpack("<d", value)[0]
    elif (field, wire) == (2, 0):
      event["step"] = value - (1 << 64) if value >> 63 else value
    elif (field, wire) == (3, 2):
      event["file_version"] = value.decode()
    elif (field, wire) == (5, 2):
      event["values"] = []
      for summary_field, summary_wire, value_bytes in _fields(value):
        assert (summary_field, summary_wire) == (1, 2)
        parts = {(f, w): v for f, w, v in _fields(value_bytes)}
        event["values"].append((parts[1, 2].decode(), struct.unpack("<f", parts[2, 5])[0]))
    else:
      raise AssertionError(f"unexpected Event field {field} (wire type {wire})")
  return event


def _read_events(path: str) -> list[dict]:
  return [_decode_event(record) for record in _read_records(path)]


def _f32(value: float) -> float:
  with np.errstate(over="ignore"):  # 1e40 -> inf is the point
    return float(np.float32(value))


def test_crc32c_known_values():
  # The standard check value of CRC-32C, and the empty string.
  assert tensorboard.crc32c_python(b"123456789") == 0xE3069283
  assert tensorboard.crc32c_python(b"") == 0
  data = np.random.default_rng(0).integers(0, 256, 300, dtype=np.uint8).tobytes()
  assert tensorboard.crc32c_python(data) == _crc32c_bitwise(data)
  assert tensorboard.crc32c(data) == _crc32c_bitwise(data)  # whichever implementation is in use


def test_scalars_round_trip(tmp_path):
  logdir = str(tmp_path / "run")  # created by the writer
  logged = [
      (0, {"loss": 2.5, "lr": 3e-4}),
      (7, {"loss": np.float32(1.1), "grad_norm": np.float64(0.1), "nan": math.nan}),
      (2**40, {"big": 1e40, "neg_inf": -math.inf, "small": 1e-45, "unicode/é": -3.0}),
  ]
  with tensorboard.SummaryWriter(logdir, filename_suffix=".dvae") as writer:
    for step, values in logged:
      writer.scalars(step, values)
  (path,) = glob.glob(os.path.join(logdir, "*"))
  name = os.path.basename(path)
  assert name.startswith("events.out.tfevents.") and name.endswith(f".{os.getpid()}.dvae")

  events = _read_events(path)
  assert events[0]["file_version"] == "brain.Event:2" and "values" not in events[0]
  assert len(events) == 1 + len(logged)
  for event, (step, values) in zip(events[1:], logged):
    assert event["step"] == step and "file_version" not in event
    assert [tag for tag, _ in event["values"]] == list(values)
    for (_, got), want in zip(event["values"], values.values()):
      if math.isnan(want):
        assert math.isnan(got)
      else:
        assert got == _f32(want)  # exact: the file holds float32
  assert events[3]["values"][0][1] == math.inf  # past float32's range, not an error
  wall_times = [event["wall_time"] for event in events]
  assert wall_times == sorted(wall_times) and abs(wall_times[0] - os.path.getmtime(path)) < 60


def test_resume_adds_a_file(tmp_path):
  logdir = str(tmp_path)
  with tensorboard.SummaryWriter(logdir) as writer:
    writer.scalars(1, {"loss": 1.0})
  # Same process, same second: must not reuse (and truncate) the first file.
  with tensorboard.SummaryWriter(logdir) as writer:
    writer.scalars(2, {"loss": 0.5})
  paths = sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*")))
  assert len(paths) == 2
  assert [[e["step"] for e in _read_events(p)] for p in paths] == [[0, 1], [0, 2]]


def test_tensorboard_reads_it(tmp_path):
  event_accumulator = pytest.importorskip(
      "tensorboard.backend.event_processing.event_accumulator")
  logdir = str(tmp_path)
  with tensorboard.SummaryWriter(logdir) as writer:
    for step in range(4):
      writer.scalars(step, {"train/loss": 1.0 / (step + 1), "train/lr": step * 1e-4})
  # A resumed run writes a second file; TensorBoard reads the directory as one series.
  with tensorboard.SummaryWriter(logdir) as writer:
    for step in range(4, 6):
      writer.scalars(step, {"train/loss": -float(step)})
  accumulator = event_accumulator.EventAccumulator(logdir)
  accumulator.Reload()
  assert sorted(accumulator.Tags()["scalars"]) == ["train/loss", "train/lr"]
  loss = [(e.step, e.value) for e in accumulator.Scalars("train/loss")]
  assert loss == [(0, 1.0), (1, 0.5), (2, _f32(1 / 3)), (3, 0.25), (4, -4.0), (5, -5.0)]
  lr = [(e.step, e.value) for e in accumulator.Scalars("train/lr")]
  assert lr == [(step, _f32(step * 1e-4)) for step in range(4)]
