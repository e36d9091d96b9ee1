"""Publish a saved model folder to the Hugging Face Hub as one commit, with its model card.

    python train/publish.py FOLDER user/name [--private] [--remote-code] [--card-from RUN]

FOLDER is what train/train.py wrote (`<output_dir>/<head>/model`). The folder is checked
first (weights, config, tokenizer, card); nothing is uploaded when anything is missing. Only
the files of a model folder are uploaded (weights, configs, tokenizer, card, remote code);
the others are listed as left out, and a link out of the folder stops the upload.
`--card-from RUN` writes the card from the results of RUN, the run folder that trained this
model (checked: same head, model config and weights); `--remote-code` adds the
self-contained modeling source (auto_map) for people without hybridlm. Both change FOLDER
only once the upload is made. The token comes from HF_TOKEN or `hf auth login` (or --token,
which other users of the machine may see); the endpoint from HF_ENDPOINT. Needs
HF_HUB_OFFLINE=0.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("folder")
    p.add_argument("repo_id", help="user/name")
    p.add_argument("--token", default=None,
                   help="a write token (prefer HF_TOKEN or `hf auth login`: a command line is "
                        "visible to others)")
    p.add_argument("--private", action="store_true")
    p.add_argument("--remote-code", action="store_true",
                   help="add modeling_hybridlm.py + auto_map (into FOLDER once published)")
    p.add_argument("--card-from", default=None, metavar="RUN",
                   help="write the card from this run's output_dir (into FOLDER once "
                        "published)")
    p.add_argument("--message", default=None, help="commit message")
    args = p.parse_args(argv)

    from hybridlm import hub

    folder = Path(args.folder)
    secrets = [t for t in (args.token, os.environ.get("HF_TOKEN")) if t]

    def say(text: str, file=sys.stdout) -> None:  # never a token, whatever the text holds
        for t in secrets:
            text = text.replace(t, "<token>")
        print(text, file=file)

    try:
        info = hub.publish(folder, args.repo_id, token=args.token, private=args.private,
                           commit_message=args.message, remote_code=args.remote_code,
                           card_from=args.card_from, log=say)
    except (hub.PublishError, hub.CheckpointError) as e:
        say(f"error: {e}", sys.stderr)
        return 2
    except Exception as e:  # network / server answers: one line, not a traceback
        say(f"error: upload to the Hub failed: {type(e).__name__}: {str(e)[:500]}; nothing "
            f"in {folder} was changed", sys.stderr)
        return 1
    print(f"published {folder} to {args.repo_id} in one commit: {info.commit_url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
