"""Input data: TFDS builders (array_record), the grain pipeline, image and text processing.

  builders/      one TFDS builder per corpus (+ synthetic_shapes, the offline corpus)
  pipeline.py    config -> grain pipeline -> local batches; make_global_batch; iterator state
  transforms.py  image decoding (robust), RandomResizedCrop/flip, resize, CLIP normalisation
  text.py        BLIP caption normalisation, the named text processors (tokenisation layouts)
  tokenizers.py  Q-Former (BERT + [DEC]) and LLM tokenizers by name
  stats.py       counts of skipped / converted records
"""
