"""Builds the `image_text_pairs` dataset with Apache Beam from img2dataset output.

    python -m blip2_jax.build_pairs --manual_dir RAW --data_dir DATA [--min_image_size 64]
        [--no_dedup] [--if_exists refuse|resume|overwrite] [Beam pipeline options]

RAW holds webdataset tars or img2dataset Parquet (`data/builders/web_beam.py`); DATA gets
DATA/image_text_pairs/1.0.0, which the trainer reads with --config.input.dataset=
image_text_pairs --config.input.data_dir=DATA. Further flags are Beam pipeline options (default
--runner=DirectRunner; Dataflow, Flink, Spark: see the README). A finished dataset is refused
(`refuse`, the default), kept as it is (`resume`: TFDS builds into a temporary folder renamed at
the end, so there is no half-built dataset to continue) or rebuilt (`overwrite`). Prints a JSON
summary line: records kept, skips by reason, seconds, images/s.
"""
from __future__ import annotations

import json
import os
import sys
import time

from blip2_jax.cli import common

PROG = "blip2_jax.build_pairs"


def build_parser():
    p = common.OneLineParser(prog=PROG, description="Build image_text_pairs with Apache Beam.")
    p.add_argument("--manual_dir", required=True, help="webdataset tars or img2dataset Parquet")
    p.add_argument("--data_dir", required=True, help="TFDS data directory of the output")
    p.add_argument("--min_image_size", type=common.nonnegative_int, default=64,
                   help="images with a shorter side under this many pixels are skipped")
    p.add_argument("--max_image_pixels", type=common.positive_int, default=64_000_000)
    p.add_argument("--no_dedup", action="store_true", help="keep exact duplicate images")
    p.add_argument("--if_exists", default="refuse", choices=("refuse", "resume", "overwrite"))
    return p


def main(argv=None) -> int:
    args, beam_args = build_parser().parse_known_args(argv)

    def go():
        import tensorflow_datasets as tfds

        from blip2_jax.data.builders.base import DatasetError
        from blip2_jax.data.builders.web_beam import ImageTextPairsBeam
        from apache_beam.options.pipeline_options import PipelineOptions  # after web_beam: quiet import

        if "://" not in args.manual_dir and not os.path.isdir(args.manual_dir):
            raise DatasetError(f"--manual_dir {args.manual_dir} is not a directory")
        builder = ImageTextPairsBeam(data_dir=args.data_dir, file_format="array_record",
                                     min_image_size=args.min_image_size, dedup=not args.no_dedup,
                                     max_image_pixels=args.max_image_pixels)
        t0, built = time.perf_counter(), False
        if builder.is_prepared() and args.if_exists == "refuse":
            raise DatasetError(f"{builder.data_path} is already built; --if_exists resume keeps it, "
                               "--if_exists overwrite rebuilds it")
        if not builder.is_prepared() or args.if_exists == "overwrite":
            mode = (tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS if args.if_exists == "overwrite"
                    else tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS)
            builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
                manual_dir=args.manual_dir, download_mode=mode,
                beam_options=PipelineOptions(beam_args or ["--runner=DirectRunner"])))
            built = True
        seconds = time.perf_counter() - t0
        meta = dict(builder.info.metadata or {})
        kept = int(meta.get("kept", builder.info.splits["train"].num_examples))
        print(json.dumps({"built": built, "kept": kept, "skipped": meta.get("skipped", {}),
                          "seconds": round(seconds, 2),
                          "images_per_second": round(kept / seconds, 2) if built else None,
                          "output": str(builder.data_path)}), flush=True)

    return common.run(PROG, go)


if __name__ == "__main__":
    sys.exit(main())
