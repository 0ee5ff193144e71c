"""experiments/app.py served for real on localhost: driven with gradio_client, rendered by headless
Chromium (Debian's `chromium`, which `make setup` installs) over the DevTools protocol."""

import ast
import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

from gradio_client import Client, handle_file
import numpy as np
from PIL import Image
import pytest
from websockets.sync.client import connect

from conftest import CACHE_ENV, REPO, encode_image, random_pixels

APP = os.path.join(REPO, "experiments",
                   "app.py")
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update",
                  "--disable-sync")


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class TrapProxy:
  """A localhost proxy that serves nothing and records who connects: given to the app and to
  Chromium for every address but localhost, it sees any attempt to reach the internet."""

  def __init__(self):
    self.socket = socket.socket()
    self.socket.bind(("127.0.0.1", 0))
    self.socket.listen()
    self.url = f"http://127.0.0.1:{self.socket.getsockname()[1]}"
    self.requests: list[bytes] = []
    threading.Thread(target=self._serve, daemon=True).start()

  def _serve(self):
    while True:
      try:
        connection, _ = self.socket.accept()
      except OSError:  # closed
        return
      with connection:
        connection.settimeout(2)
        try:
          self.requests.append(connection.recv(200))
        except OSError:
          self.requests.append(b"(nothing sent)")


@pytest.fixture(scope="module")
def trap():
  proxy = TrapProxy()
  yield proxy
  proxy.socket.close()


def wait_for(condition, timeout: float, what: str, poll: float = 0.2):
  """`condition()`'s first truthy value within `timeout` seconds."""
  deadline = time.time() + timeout
  while time.time() < deadline:
    value = condition()
    if value:
      return value
    time.sleep(poll)
  raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@pytest.fixture(scope="module")
def server(tiny_runs, tmp_path_factory, trap):
  """The app on a free localhost port; yields (url, the time it was launched)."""
  # A copy of the run whose config names held-out captions too (its training ones will do).
  workdir = str(tmp_path_factory.mktemp("app") / "transformer")
  shutil.copytree(tiny_runs["transformer"], workdir)
  with open(os.path.join(workdir, "config.json")) as f:
    config = json.load(f)
  config["data"]["eval_codes_dir"] = config["data"]["codes_dir"]
  with open(os.path.join(workdir, "config.json"), "w") as f:
    json.dump(config, f)
  port = free_port()
  log = open(os.path.join(os.path.dirname(workdir), "app.log"), "w+")
  env = {**os.environ, **CACHE_ENV, "JAX_PLATFORMS": "cpu",
         "GRADIO_TEMP_DIR": str(tmp_path_factory.mktemp("gradio")),
         **{name: trap.url for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy",
                                        "https_proxy", "all_proxy")},
         "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}
  launched = time.time()
  process = subprocess.Popen(
      [sys.executable, APP, f"--workdir={workdir}",
       f"--reranker={tiny_runs['reranker']}", f"--port={port}"],
      env=env, stdout=log, stderr=subprocess.STDOUT)
  url = f"http://127.0.0.1:{port}/"

  def up():
    assert process.poll() is None, f"the app exited: {log.seek(0) or log.read()[-3000:]}"
    try:
      return urllib.request.urlopen(url, timeout=2).status == 200
    except OSError:
      return False

  try:
    wait_for(up, 180, "the app to serve")
    yield url, launched
  finally:
    process.terminate()
    process.wait(timeout=30)
    log.close()


@pytest.fixture(scope="module")
def client(server):
  return Client(server[0], verbose=False)


def draw(client, caption="a red circle", guidance=1, top_k=0, temperature=1, candidates=4,
         keep=2, seed=0, prime=None, prime_rows=0):
  return client.predict(caption, guidance, top_k, temperature, candidates, keep, seed, prime,
                        prime_rows, api_name="/generate")


def pixels(gallery) -> np.ndarray:
  return np.stack([np.asarray(Image.open(item["image"]).convert("RGB")) for item in gallery])


def test_draws_reranked_images_and_a_seed_repeats_them(server, client):
  gallery, status = draw(client, seed=3)
  print(f"\nlaunch to first image: {time.time() - server[1]:.1f} s")
  images = pixels(gallery)
  assert images.shape == (2, 16, 16, 3) and images.dtype == np.uint8
  assert [item["caption"].split(",")[0] for item in gallery] == ["#1 of 4", "#2 of 4"]
  scores = [float(item["caption"].split("score ")[1]) for item in gallery]
  assert scores[0] >= scores[1]
  assert "Drew 4 for 'a red circle'" in status and "reranker" in status
  np.testing.assert_array_equal(pixels(draw(client, seed=3)[0]), images)
  assert not np.array_equal(pixels(draw(client, seed=4)[0]), images)


def test_bad_input_is_reported_in_the_page(client, tmp_path):
  for caption in ("", "   "):
    gallery, status = draw(client, caption=caption)
    assert gallery == [] and "a caption is empty" in status
  gallery, status = draw(client, caption=" ".join(["circle"] * 40))
  assert len(gallery) == 2 and "truncated to" in status and "16 text tokens" in status
  not_an_image = tmp_path / "photo.png"
  not_an_image.write_text("this is text")
  gallery, status = draw(client, prime=handle_file(str(not_an_image)), prime_rows=2)
  assert gallery == [] and "is not an image" in status
  gallery, status = draw(client, candidates=2, keep=3)
  assert gallery == [] and "1 <= keep <= num_candidates" in status
  # Outside a slider's range: Gradio refuses it before the app runs, with the range.
  with pytest.raises(Exception, match="greater than maximum value 10"):
    draw(client, guidance=99)
  with pytest.raises(Exception, match="less than minimum value 0"):
    draw(client, seed=-1)
  assert len(draw(client, seed=None)[0]) == 2  # an emptied seed box: seed 0


def test_a_prime_image_keeps_its_rows(client, tmp_path):
  picture = tmp_path / "prime.png"
  picture.write_bytes(encode_image(random_pixels(0, 32, 32)))
  gallery, status = draw(client, caption="", prime=handle_file(str(picture)), prime_rows=4,
                         candidates=2, keep=2)
  # Every row of codes kept: both candidates decode the prime's codes, the same image.
  images = pixels(gallery)
  assert images.shape == (2, 16, 16, 3) and "Drew 2" in status
  np.testing.assert_array_equal(images[0], images[1])


class DevTools:
  """Headless Chromium driven over the DevTools protocol (one page)."""

  def __init__(self, profile: str, proxy: str, size=(1280, 900)):
    self.process = subprocess.Popen(
        [shutil.which("chromium") or "chromium", *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
         f"--proxy-server={proxy}", "--proxy-bypass-list=127.0.0.1",
         "--remote-debugging-port=0", f"--window-size={size[0]},{size[1]}", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    port_file = os.path.join(profile, "DevToolsActivePort")
    port = wait_for(lambda: os.path.exists(port_file) and open(port_file).readline().strip(),
                    60, "Chromium's DevTools port")
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as response:
      page = next(t for t in json.load(response) if t["type"] == "page")
    self.socket = connect(page["webSocketDebuggerUrl"], max_size=None)
    self.ids = 0
    self.requested: list[str] = []  # every URL the page asked for
    self.call("Network.enable")
    self.call("Emulation.setDeviceMetricsOverride", width=size[0], height=size[1],
              deviceScaleFactor=1, mobile=False)

  def call(self, method: str, **params):
    self.ids += 1
    self.socket.send(json.dumps({"id": self.ids, "method": method, "params": params}))
    while True:  # events arrive in between; the reply carries our id
      message = json.loads(self.socket.recv(timeout=60))
      if message.get("method") == "Network.requestWillBeSent":
        self.requested.append(message["params"]["request"]["url"])
      if message.get("id") == self.ids:
        assert "error" not in message, message
        return message["result"]

  def evaluate(self, expression: str):
    return self.call("Runtime.evaluate", expression=expression,
                     returnByValue=True)["result"].get("value")

  def close(self):
    self.socket.close()
    self.process.terminate()
    self.process.wait(timeout=30)


def screenshot_after_drawing(url: str, caption: str, path: str, proxy: str,
                             timeout: float = 120) -> dict:
  """Opens the app in headless Chromium (every other address through `proxy`, which serves
  nothing), types `caption`, clicks Generate, waits for the gallery and saves a PNG screenshot to
  `path`. Returns what the page shows (from its DOM) and the URLs it asked for elsewhere."""
  profile = tempfile.mkdtemp(prefix="chromium-profile-")
  browser = DevTools(profile, proxy)
  try:
    browser.call("Page.navigate", url=url)
    wait_for(lambda: browser.evaluate("!!document.querySelector('#caption textarea')"),
             timeout, "the page to render")
    browser.evaluate(f"""(() => {{
        const box = document.querySelector('#caption textarea');
        box.value = {json.dumps(caption)};
        box.dispatchEvent(new Event('input', {{bubbles: true}}));
        setTimeout(() => document.querySelector('#generate').click(), 300);
    }})()""")
    count = "document.querySelectorAll('#gallery img').length"
    wait_for(lambda: browser.evaluate(count), timeout, "the gallery to show images")
    time.sleep(1)  # the images' decode and layout
    shown = browser.evaluate("""({
        images: document.querySelectorAll('#gallery img').length,
        status: document.querySelector('#status').innerText,
        examples: document.body.innerText.includes('held-out: ')})""")
    shown["elsewhere"] = [u for u in browser.requested
                          if not u.startswith((url, "data:", "blob:"))]
    shown["from_app"] = sum(u.startswith(url) for u in browser.requested)
    data = browser.call("Page.captureScreenshot", format="png")["data"]
    with open(path, "wb") as f:
      f.write(base64.b64decode(data))
    return shown
  finally:
    browser.close()
    shutil.rmtree(profile, ignore_errors=True)


def test_the_page_renders_the_gallery_in_chromium(server, client, tmp_path):
  draw(client)  # compiled already: the page's click only samples
  path = str(tmp_path / "app.png")
  browser_trap = TrapProxy()  # Chromium's own background calls go here, not out
  shown = screenshot_after_drawing(server[0], "a blue square", path, browser_trap.url)
  browser_trap.socket.close()
  # Scripts, styles, fonts and images all from the app, none from another address.
  assert shown["from_app"] > 10 and shown["elsewhere"] == []
  assert shown["images"] == 4 and "Drew 8 for 'a blue square'" in shown["status"]
  assert shown["examples"]  # the run's held-out captions, marked
  screenshot = np.asarray(Image.open(path).convert("RGB"))
  assert screenshot.shape == (900, 1280, 3)
  # The tiny model's samples are noise: many colours, where the empty page has a handful.
  assert len(np.unique(screenshot.reshape(-1, 3), axis=0)) > 1000


def test_a_demo_run_is_reranked_by_its_reranker_or_else_its_dataset_s_near_misses(tmp_path):
  work = tmp_path / "run" / "work"
  (work / "transformer").mkdir(parents=True)
  script = ("import sys; sys.path.insert(0, sys.argv[1]); import app; "
            "print(repr(app.run_paths(sys.argv[2], None, None)))")

  def resolved():
    done = subprocess.run([sys.executable, "-c", script, os.path.dirname(APP),
                           str(tmp_path / "run")], env={**os.environ, **CACHE_ENV,
                                                        "JAX_PLATFORMS": "cpu"},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return ast.literal_eval(done.stdout.strip().splitlines()[-1])

  transformer = str(work / "transformer")
  (work / "dataset").write_text("shapes\n")
  assert resolved() == (transformer, None, "shapes")
  (work / "dataset").write_text("emoji\n")
  assert resolved() == (transformer, None, None)
  (work / "reranker").mkdir()
  assert resolved() == (transformer, str(work / "reranker"), None)


def test_nothing_reaches_out(server, client, trap):
  """Run last: the app (analytics, version checks) tried to reach no other address in any test
  above."""
  draw(client)
  assert trap.requests == []
