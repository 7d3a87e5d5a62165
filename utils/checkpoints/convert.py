"""Convert one of the authors' released checkpoints to this project's format.

    python -m utils.checkpoints.convert THEIR_FILE.tar OUT.tar [--overwrite]

The output loads with ``-e`` like any of our checkpoints (``-e`` also reads the authors'
file directly, converting it on the fly) and can be resumed or fine-tuned: copy it to
``checkpoint/<name>.last.tar`` and train with ``--save <name>.tar --resume``. The authors
did not save their class weights, so such a run starts a new class head (and a new
optimizer) at epoch 0; the backbone and the assignment matrices V_m carry over.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from utils.errors import OneLineParser, report_error

PROG = "python -m utils.checkpoints.convert"


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog=PROG, description="Convert an authors' OPQN checkpoint ({'backbone', "
                "'mlp'}) to this project's format.")
    p.add_argument("input", help="the authors' checkpoint file")
    p.add_argument("output", help="where to write the converted checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    return p


def convert_file(source: str | Path, target: str | Path) -> dict:
    """Convert ``source`` (authors' format) and write it atomically to ``target``.

    Returns the written configuration dict. Raises ``CheckpointError`` for a file that is
    not in the authors' format (including one already in ours).
    """
    import torch

    from .authors_format import convert_authors_checkpoint, is_authors_format
    from .store import CheckpointError, load_checkpoint, save_checkpoint

    obj = load_checkpoint(source, require_format=False)
    if obj.get("format") is not None:
        raise CheckpointError(f"{source} is already in this project's format; nothing to "
                              f"convert", source)
    if not is_authors_format(obj):
        keys = ", ".join(str(k) for k in list(obj)[:12])
        raise CheckpointError(f"{source} is not in the authors' format ('backbone' state_dict "
                              f"+ 'mlp' tensor); its keys: {keys or 'none'}", source)
    state = convert_authors_checkpoint(obj, source)
    state["best_loss"] = float("inf")
    state["backbone"] = {k: v.contiguous() for k, v in state["backbone"].items()}
    state["quantizer"] = {k: torch.as_tensor(v).contiguous() for k, v in state["quantizer"].items()}
    save_checkpoint(state, target)
    return state["config"]


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .store import CheckpointError

    source, target = Path(args.input), Path(args.output)
    try:
        if source.resolve() == target.resolve():
            raise ValueError("OUT must differ from IN")
        if target.exists() and not args.overwrite:
            raise ValueError(f"{target} exists (add --overwrite to replace it)")
        config = convert_file(source, target)
    except ValueError as exc:
        return report_error(PROG, str(exc), 2)
    except CheckpointError as exc:
        return report_error(PROG, str(exc), 2 if "not found" in str(exc) else 1)
    print(f"{target}: {config['bits']}-bit ({config['num_books']}x{config['num_words']}), "
          f"D={config['feature_dim']}, input {config['input_size']}x{config['input_size']}, "
          f"width {config['width']}; no class weights (resuming starts a new class head)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
