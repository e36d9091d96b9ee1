"""Evaluate a saved model folder on every domain's validation and test split.

    python eval/evaluate.py --model runs/default/spiking_pc/model [--config ...] [k=v ...]

Writes `<model folder>.eval.json` beside the model folder (or --out) with loss, perplexity,
next-token accuracy and, for spiking heads, the firing rate per domain and split.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from accelerate import Accelerator
from transformers import AutoModelForCausalLM, AutoTokenizer

import hybridlm  # noqa: F401  (registers the model with the Auto classes)
from hybridlm.config import ConfigError, keys_help, load_config
from hybridlm.corpora import DataError
from hybridlm.data import build_corpora, subsample, tokenizer_fingerprint
from hybridlm.evaluation import Blocks, evaluate
from hybridlm.hub import CheckpointError, check_model_folder
from hybridlm.io import write_json_atomic
from hybridlm.trunks import resolve_trunk


def eval_json(folder: Path) -> Path:
    """Where a model folder's results go: beside it, named after it (`<head>/model` ->
    `<head>/model.eval.json`), so the results of sibling folders never overwrite each other."""
    folder = folder.resolve()
    return folder.with_name(f"{folder.name}.eval.json")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, epilog=keys_help(),
                                formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", default="configs/default.yaml")
    p.add_argument("--model", required=True, help="a folder written by save_pretrained")
    p.add_argument("--out", default=None,
                   help="where to write the JSON (default: MODEL.eval.json, beside MODEL)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("overrides", nargs="*", help="section.key=value")
    args = p.parse_intermixed_args(argv)  # overrides before and after flags
    try:
        cfg = load_config(args.config, args.overrides)
        folder = Path(args.model)
        try:  # names the missing or broken file before anything loads it
            check_model_folder(folder)
        except CheckpointError as e:
            raise CheckpointError(f"{e}; pass --model a complete folder that train/train.py "
                                  "saved (<output_dir>/<head>/model)") from e
        model = AutoModelForCausalLM.from_pretrained(folder)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        data_tok = AutoTokenizer.from_pretrained(
            resolve_trunk(cfg.model.encoder, cfg.data.cache_dir).path)
        if tokenizer_fingerprint(tokenizer) != tokenizer_fingerprint(data_tok):
            raise ValueError(
                f"the model's tokenizer differs from the one of encoder '{cfg.model.encoder}' "
                "that builds this config's data: evaluate with the config it was trained with"
            )
        domains = build_corpora(cfg.data, tokenizer)
    except (ConfigError, DataError, ValueError, OSError) as e:  # CheckpointError: a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 2
    accelerator = Accelerator()
    results = {}
    for split in ("validation", "test"):
        results[split] = {}
        for dom in domains:
            blocks = Blocks(subsample(dom.splits[split], cfg.data.max_eval_tokens_per_domain,
                                      cfg.data.block_size, cfg.data.subsample_seed))
            results[split][dom.name] = evaluate(model, blocks, accelerator, args.batch_size, None)
    out = Path(args.out) if args.out else eval_json(folder)
    if accelerator.is_main_process:
        write_json_atomic(out, {"model": str(folder), **results})
        for split, res in results.items():
            ppl = ", ".join(f"{d} {r['perplexity']:.2f}" for d, r in res.items())
            print(f"{split} perplexity: {ppl}")
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
