"""Build the corpora of a config: split, tokenize and pack every domain (cached).

    python data/build.py --config configs/default.yaml [section.key=value ...]

Prints documents, tokens and blocks per domain and split. A second run reuses the cache.
"""

from __future__ import annotations

import argparse
import sys
import time

from hybridlm.config import ConfigError, keys_help, load_config
from hybridlm.corpora import DataError
from hybridlm.data import build_corpora, format_report
from hybridlm.trunks import TrunkError, load_tokenizer, resolve_trunk


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, epilog=keys_help(),
                                formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", default="configs/default.yaml")
    p.add_argument("--resume", action="store_true", help="ignored (accepted like train.py)")
    p.add_argument("--no-wandb", action="store_true", help="ignored (accepted like train.py)")
    p.add_argument("overrides", nargs="*", help="section.key=value")
    args = p.parse_intermixed_args(argv)  # overrides before and after flags
    start = time.perf_counter()
    try:
        cfg = load_config(args.config, args.overrides)
        trunk = resolve_trunk(cfg.model.encoder, cfg.data.cache_dir)
        tokenizer = load_tokenizer(trunk, cfg.data.block_size)
        domains = build_corpora(cfg.data, tokenizer)
    except (ConfigError, DataError, TrunkError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_report(domains))
    print(f"data ready in {time.perf_counter() - start:.1f} s (cache: {cfg.data.cache_dir})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
