"""Publish a saved model folder to the Hugging Face Hub as one commit, with its model card.

    python train/publish.py FOLDER user/name [--private] [--remote-code] [--card-from RUN]

FOLDER is what train/train.py wrote (`<output_dir>/<head>/model`). The folder is checked
first (weights, config, tokenizer, card); nothing is uploaded when anything is missing.
`--card-from RUN` (re)writes the card from RUN's metrics.json files before publishing;
`--remote-code` adds the self-contained modeling source (auto_map) for people without
hybridlm. The token comes from --token, HF_TOKEN or `hf auth login`; the endpoint from
HF_ENDPOINT. Needs HF_HUB_OFFLINE=0.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("folder")
    p.add_argument("repo_id", help="user/name")
    p.add_argument("--token", default=None)
    p.add_argument("--private", action="store_true")
    p.add_argument("--remote-code", action="store_true",
                   help="write modeling_hybridlm.py + auto_map into the folder first")
    p.add_argument("--card-from", default=None, metavar="RUN",
                   help="write the card from this run's output_dir first")
    p.add_argument("--message", default=None, help="commit message")
    args = p.parse_args(argv)

    from hybridlm import hub

    folder = Path(args.folder)
    try:
        hub.check_repo_id(args.repo_id)
        if args.remote_code:
            hub.check_model_folder(folder, require_tokenizer=False)
            hub.export_remote_code(folder)
        if args.card_from:
            head = hub.check_model_folder(folder, require_tokenizer=False).get("head")
            hub.write_card_for_run(args.card_from, head, args.repo_id, folder)
        info = hub.publish(folder, args.repo_id, token=args.token, private=args.private,
                           commit_message=args.message)
    except (hub.PublishError, hub.CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # network / server answers: one line, not a traceback
        print(f"error: upload to the Hub failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print(f"published {folder} to {args.repo_id} in one commit: {info.commit_url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
