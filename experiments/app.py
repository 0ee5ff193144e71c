"""A web page that draws images from a trained run: caption in, reranked images out.

  make app RUN=demo_out           # after `make demo`; then open http://127.0.0.1:7860
  python experiments/app.py --run=demo_out --port=7860
  python experiments/app.py --workdir=runs/transformer --reranker=runs/reranker
  python experiments/app.py --workdir=runs/transformer --near_misses=shapes

A caption, the sampling settings (guidance, top-k, temperature), how many candidates to draw and
how many of the best to keep, a seed, and optionally an image whose top rows of codes every
sample keeps. Candidates are reranked by a reranker run or, for a dataset with near-miss captions
(the shapes demo), by the transformer itself. The gallery shows the kept images with their
scores; the examples are captions from the run's dataset, held-out ones marked. Bad input is
reported in the page. Serves on localhost only; nothing is sent out or downloaded (Gradio's
analytics are off).
"""

import os
import time

# Before Gradio is imported: it reads this once, and would otherwise report usage and check
# for new versions over the network.
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"

from absl import app, flags, logging  # noqa: E402
import gradio as gr  # noqa: E402

from dalle_jax import generate  # noqa: E402
from dalle_jax.transformer import caption_contrast  # noqa: E402

_RUN = flags.DEFINE_string("run", None, "A `make demo` output directory (--out): its "
                           "work/transformer is served, reranked by work/reranker when present, "
                           "else by its dataset's near misses when it has them.")
_WORKDIR = flags.DEFINE_string("workdir", None, "A train_transformer.py workdir (instead of --run).")
_RERANKER = flags.DEFINE_string("reranker", None, "A train_reranker.py workdir (with --workdir).")
_NEAR_MISSES = flags.DEFINE_enum("near_misses", None, sorted(caption_contrast.NEAR_MISSES),
                                 "With --workdir, instead of --reranker: the transformer reranks, "
                                 "against each caption's near misses.")
_DVAE = flags.DEFINE_string("dvae", None, "A train_dvae.py workdir, or a directory with OpenAI's "
                            "encoder.pkl and decoder.pkl; default: the one the run names.")
_HOST = flags.DEFINE_string("host", "127.0.0.1", "Address to serve on (localhost by default).")
_PORT = flags.DEFINE_integer("port", 7860, "Port to serve on.")
flags.mark_flags_as_mutual_exclusive(["run", "workdir"], required=True)

MAX_CANDIDATES = 64


def run_paths(run: str | None, workdir: str | None, reranker: str | None,
              near_misses: str | None = None) -> tuple[str, str | None, str | None]:
  """The transformer and reranker workdirs and the near misses, named by --run or by --workdir,
  --reranker and --near_misses."""
  if run is None:
    return workdir, reranker, near_misses
  transformer = os.path.join(run, "work", "transformer")
  if not os.path.isdir(transformer):
    raise app.UsageError(f"{transformer} not found: --run takes the --out of `make demo` "
                         "(demo_out by default); or pass --workdir")
  reranker = os.path.join(run, "work", "reranker")
  if os.path.isdir(reranker):
    return transformer, reranker, None
  dataset = os.path.join(run, "work", "dataset")  # written by demo.py
  name = None
  if os.path.isfile(dataset):
    with open(dataset) as f:
      name = f.read().strip()
  return transformer, None, name if name in caption_contrast.NEAR_MISSES else None


def draw(gen: generate.Generator, caption: str, guidance: float, top_k: float,
         temperature: float, candidates: float, keep: float, seed: float, prime: str | None,
         prime_rows: float) -> tuple[list, str]:
  """One click: (gallery of (image, label), status markdown). Bad input becomes a warning in
  the page and an empty gallery, never an exception."""
  try:
    result = gen.generate(
        [caption or ""], num_candidates=int(candidates), keep=int(keep),
        temperature=temperature, top_k=int(top_k), guidance=guidance, prime_image=prime,
        prime_rows=int(prime_rows) if prime else 0, seed=int(seed or 0), progress=True)
  except generate.GenerationError as error:
    gr.Warning(str(error))
    return [], f"**Not drawn:** {error}"
  scores = None if result.scores is None else result.scores[0]
  labels = [f"#{rank + 1} of {int(candidates)}"
            + ("" if scores is None else f", score {scores[rank]:.3f}")
            for rank in range(len(result.images[0]))]
  for note in result.notes:
    gr.Warning(note)
  timing = result.timing
  status = [f"Drew {int(candidates)} for {result.texts[0]!r} in "
            f"{timing['compile_s'] + timing['sampling_s']:.2f} s"
            + (f" (compiling {timing['compile_s']:.1f} s)" if timing["compile_s"] else "")
            + (f", kept the {int(keep)} the reranker scores best." if gen.has_reranker
               else ".")]
  status += [f"**Note:** {note}" for note in result.notes]
  return list(zip(result.pil()[0], labels)), "\n\n".join(status)


def build(gen: generate.Generator) -> gr.Blocks:
  """The page: settings on the left, the gallery and a status line on the right."""
  grid = gen.config.image_size
  with gr.Blocks(title="dalle_jax", analytics_enabled=False) as page:
    gr.Markdown(f"## dalle_jax: draw {gen.image_size}x{gen.image_size} images from a caption\n"
                f"Captions are read up to {gen.text_len} tokens; "
                + ("a reranker keeps the best candidates." if gen.has_reranker
                   else "no reranker: every candidate is kept."))
    with gr.Row():
      with gr.Column(scale=1):
        caption = gr.Textbox(label="Caption", lines=2, elem_id="caption",
                             placeholder="a caption, or empty with a prime image (variations)")
        examples = gen.example_captions()
        if examples:
          gr.Examples(
              [[text] for text, _ in examples], [caption],
              example_labels=[("held-out: " if held_out else "") + text
                              for text, held_out in examples],
              label="Captions from the run's dataset (held-out ones were never trained on)")
        guidance = gr.Slider(0, 10, value=1, step=0.5, label="Guidance (1: off)")
        top_k = gr.Slider(0, gen.config.image_vocab_size, value=0, step=1,
                          label="Top-k (0: no filter)")
        temperature = gr.Slider(0.1, 2, value=1, step=0.05, label="Temperature")
        candidates = gr.Slider(1, MAX_CANDIDATES, value=8 if gen.has_reranker else 4, step=1,
                               label="Candidates drawn")
        keep = gr.Slider(1, MAX_CANDIDATES, value=4, step=1,
                         label="Kept (the reranker's best)" if gen.has_reranker
                         else "Kept (all, without a reranker)")
        seed = gr.Number(0, precision=0, minimum=0, maximum=2**31 - 1, label="Seed")
        prime = gr.File(label="Prime image (optional)", file_types=["image"], type="filepath")
        prime_rows = gr.Slider(0, grid, value=grid // 2, step=1,
                               label=f"Rows of codes kept from the prime image (of {grid})")
        button = gr.Button("Generate", variant="primary", elem_id="generate")
      with gr.Column(scale=2):
        gallery = gr.Gallery(label="Kept images", columns=4, elem_id="gallery", format="png",
                             object_fit="contain", height="auto")
        status = gr.Markdown(elem_id="status")
    inputs = [caption, guidance, top_k, temperature, candidates, keep, seed, prime, prime_rows]

    def event(*values, progress=gr.Progress(track_tqdm=True)):  # the draw's tqdm bar, in the page
      del progress
      return draw(gen, *values)

    button.click(event, inputs, [gallery, status], api_name="generate")
    caption.submit(event, inputs, [gallery, status], api_visibility="undocumented")  # Enter
  return page


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every file it reads at INFO
  began = time.perf_counter()
  transformer, reranker, near_misses = run_paths(_RUN.value, _WORKDIR.value, _RERANKER.value,
                                                 _NEAR_MISSES.value)
  gen = generate.Generator.load(transformer, reranker=reranker, near_misses=near_misses,
                                dvae=_DVAE.value)
  page = build(gen)
  print(f"loaded {transformer} in {time.perf_counter() - began:.1f} s; serving on "
        f"http://{_HOST.value}:{_PORT.value}", flush=True)
  page.queue().launch(server_name=_HOST.value, server_port=_PORT.value, show_error=True,
                      ssr_mode=False, mcp_server=False, share=False, inbrowser=False,
                      footer_links=[], theme=gr.themes.Default())


if __name__ == "__main__":
  app.run(main)
