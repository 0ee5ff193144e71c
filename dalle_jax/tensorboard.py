"""TensorBoard scalars without TensorFlow: a minimal event-file writer.

    writer = SummaryWriter("runs/dvae")
    writer.scalars(step, {"loss": 1.25, "lr": 3e-4})
    writer.close()

An event file is a sequence of TFRecords (length, masked CRC32C of the length, data, masked CRC32C
of the data), each holding one serialized `Event` protobuf; the first carries the file version.
The few protobuf fields needed are encoded by hand, so neither TensorFlow nor the `protobuf`
package is a dependency:

    Event   {double wall_time = 1; int64 step = 2; string file_version = 3; Summary summary = 5}
    Summary {repeated Value value = 1}
    Value   {string tag = 1; float simple_value = 2}

Every writer opens a new file (named by time, host and pid), so a resumed run adds a file next to
the old ones instead of overwriting them; TensorBoard merges all files in a directory.
"""

from __future__ import annotations

import math
import os
import socket
import struct
import time
from collections.abc import Mapping

FILE_VERSION = "brain.Event:2"


def _crc32c_table() -> tuple[int, ...]:
  table = []
  for byte in range(256):
    crc = byte
    for _ in range(8):
      crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
    table.append(crc)
  return tuple(table)


_CRC32C_TABLE = _crc32c_table()


def crc32c_python(data: bytes) -> int:
  """CRC32C (Castagnoli) of `data`, one table lookup per byte."""
  crc = 0xFFFFFFFF
  table = _CRC32C_TABLE
  for byte in data:
    crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


try:  # A C implementation if one happens to be installed (google-cloud-storage brings it).
  from google_crc32c import value as crc32c
except ImportError:
  crc32c = crc32c_python


def masked_crc32c(data: bytes) -> int:
  """The TFRecord checksum: CRC32C rotated right by 15 bits plus a constant, mod 2**32."""
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def tfrecord(data: bytes) -> bytes:
  """`data` framed as one TFRecord."""
  length = struct.pack("<Q", len(data))
  return (length + struct.pack("<I", masked_crc32c(length)) + data
          + struct.pack("<I", masked_crc32c(data)))


def _varint(value: int) -> bytes:
  value &= 0xFFFFFFFFFFFFFFFF  # negative int64s are encoded as their 64-bit two's complement
  out = bytearray()
  while value > 0x7F:
    out.append((value & 0x7F) | 0x80)
    value >>= 7
  out.append(value)
  return bytes(out)


def _length_delimited(field: int, payload: bytes) -> bytes:
  return _varint(field << 3 | 2) + _varint(len(payload)) + payload


def _float32(value: float) -> bytes:
  value = float(value)
  try:
    return struct.pack("<f", value)
  except OverflowError:  # finite but past float32's range: inf, as a float32 cast would give
    return struct.pack("<f", math.copysign(math.inf, value))


def encode_event(wall_time: float, step: int, *, file_version: str | None = None,
                 scalars: Mapping[str, float] | None = None) -> bytes:
  """A serialized `Event` with a file version or a summary of simple values (float32)."""
  event = _varint(1 << 3 | 1) + struct.pack("<d", wall_time) + _varint(2 << 3 | 0) + _varint(step)
  if file_version is not None:
    event += _length_delimited(3, file_version.encode())
  if scalars is not None:
    summary = b"".join(
        _length_delimited(1, _length_delimited(1, str(tag).encode())
                          + _varint(2 << 3 | 5) + _float32(value))
        for tag, value in scalars.items())
    event += _length_delimited(5, summary)
  return event


class SummaryWriter:
  """Writes scalar summaries to a new event file in `logdir`."""

  def __init__(self, logdir: str, filename_suffix: str = ""):
    self.logdir = logdir
    os.makedirs(logdir, exist_ok=True)
    base = os.path.join(
        logdir, f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}")
    # Two writers in one process within the same second would share a name: never overwrite,
    # number the later one instead ("tfevents" in the name is all TensorBoard looks for).
    for attempt in range(1000):
      self.path = base + (f".{attempt}" if attempt else "") + filename_suffix
      try:
        self._file = open(self.path, "xb")
        break
      except FileExistsError:
        continue
    else:
      raise FileExistsError(f"no free event file name for {base}")
    self._write(encode_event(time.time(), 0, file_version=FILE_VERSION))
    self.flush()

  def _write(self, event: bytes) -> None:
    self._file.write(tfrecord(event))

  def scalars(self, step: int, values: Mapping[str, float]) -> None:
    """One event at `step` holding every value as a float32 scalar; NaN and inf are kept."""
    self._write(encode_event(time.time(), int(step), scalars=values))
    # Logging is rare next to training steps: flush each time so TensorBoard sees the values now
    # and a killed run loses none of them.
    self.flush()

  def flush(self) -> None:
    self._file.flush()

  def close(self) -> None:
    if not self._file.closed:
      self._file.close()

  def __enter__(self) -> SummaryWriter:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()
