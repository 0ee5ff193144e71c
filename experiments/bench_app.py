"""How long the web app takes from launch to its first images, as a user meets it (cold: no
compilation cache), and a second draw once compiled.

  python experiments/bench_app.py --workdir=demo_out/work/transformer \
      --reranker=demo_out/work/reranker

Starts experiments/app.py on a free localhost port, waits until it serves, draws through
gradio_client (the default page settings: 8 candidates, 4 kept) and prints the times.
"""

import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

from absl import app, flags
from gradio_client import Client
import logging as std_logging

_WORKDIR = flags.DEFINE_string("workdir", None, "A train_transformer.py workdir.", required=True)
_RERANKER = flags.DEFINE_string("reranker", None, "A train_reranker.py workdir.")
_CAPTION = flags.DEFINE_string("caption", "a small red circle in the top left corner",
                               "The caption drawn.")


def main(argv):
  del argv
  std_logging.getLogger("httpx").setLevel(std_logging.WARNING)  # a line per request otherwise
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  command = [sys.executable, os.path.join(os.path.dirname(__file__), "app.py"),
             f"--workdir={_WORKDIR.value}", f"--port={port}"]
  if _RERANKER.value:
    command.append(f"--reranker={_RERANKER.value}")
  # No persistent compilation cache: the first draw compiles, as on a user's first launch.
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
  log = tempfile.NamedTemporaryFile("w+", suffix=".log")
  launched = time.perf_counter()
  process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
  url = f"http://127.0.0.1:{port}/"
  try:
    while True:
      if process.poll() is not None:
        log.seek(0)
        raise RuntimeError(f"the app exited:\n{log.read()[-3000:]}")
      try:
        if urllib.request.urlopen(url, timeout=2).status == 200:
          break
      except OSError:
        time.sleep(0.2)
    serving = time.perf_counter() - launched
    client = Client(url, verbose=False)
    draw = lambda seed: client.predict(_CAPTION.value, 1, 0, 1, 8, 4, seed, None, 0,
                                       api_name="/generate")
    gallery, status = draw(0)
    first = time.perf_counter() - launched
    began = time.perf_counter()
    draw(1)
    again = time.perf_counter() - began
  finally:
    process.terminate()
    process.wait(timeout=30)
  print(f"serving after {serving:.1f} s; first {len(gallery)} images after {first:.1f} s "
        f"({status.splitlines()[0]}); the next draw (compiled) {again:.2f} s")


if __name__ == "__main__":
  app.run(main)
