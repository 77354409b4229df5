"""A trainer checkpoint as an HF-format model directory, in one process, with no GPU.

A run's checkpoints/step-N/ (train_dapo.py's save_checkpoint) holds the model sharded
(torch.distributed.checkpoint: each trainer wrote its part), the run's config, and in
model/ the model's HF config and tokenizer. This reads the model's part whatever number
of trainers wrote it, in the run's dtype (its --dtype; `auto`: the model config's), and
writes safetensors, config and tokenizer as the run's final/ is written: transformers
and vLLM load it. Like evaluate.py, this file never imports the trainer.

    python -m eval.export runs/demo/checkpoints/step-200                # -> runs/demo/exports/step-200
    python -m eval.export runs/demo/checkpoints/step-200 --out step-200-hf
"""
import argparse
import json
import os
import re
import shutil
import warnings

import torch
import torch.distributed.checkpoint as dcp

from data_prep import FlagParser


class CheckpointError(ValueError):
    """No complete checkpoint, run or model where one is named, or an export that would
    overwrite something: one line naming it."""


def checkpoints(run_dir: str) -> dict[int, str]:
    """A run's complete checkpoints by step, as the trainer lists them (checkpoint_dirs): a
    save cut short leaves only step-N.partial, which is never one."""
    root = os.path.join(run_dir, "checkpoints")
    names = os.listdir(root) if os.path.isdir(root) else []
    return {int(n[5:]): os.path.join(root, n) for n in names if n.startswith("step-") and n[5:].isdigit()}


def run_of(path: str) -> str:
    """The run directory of a checkpoint (RUN/checkpoints/step-N) or of RUN/final."""
    parent = os.path.dirname(os.path.normpath(path))
    return os.path.dirname(parent) if os.path.basename(parent) == "checkpoints" else parent


def is_checkpoint(path: str) -> bool:
    """Named or made as the trainer makes a checkpoint, complete or not."""
    return (re.fullmatch(r"step-\d+(\.partial)?", os.path.basename(os.path.normpath(path))) is not None
            or any(os.path.exists(os.path.join(path, f)) for f in (".metadata", "trainer_state.pt")))


def check_checkpoint(path: str) -> None:
    """A CheckpointError naming why `path` cannot be exported: not there (the run's steps
    named), cut short, foreign, or written before checkpoints carried their model/."""
    if not os.path.isdir(path):
        steps = ", ".join(f"step-{n}" for n in sorted(checkpoints(run_of(path)))) or "none"
        raise CheckpointError(f"{path}: no such checkpoint ({os.path.join(run_of(path), 'checkpoints')} has "
                              f"{steps})")
    if path.rstrip("/").endswith(".partial"):
        raise CheckpointError(f"{path}: an incomplete checkpoint (a save cut short; complete ones are renamed step-N)")
    missing = [f for f in (".metadata", "trainer_state.pt", "config.json", "model/config.json")
               if not os.path.exists(os.path.join(path, f))]
    if {".metadata", "trainer_state.pt"} <= set(missing):
        raise CheckpointError(f"{path}: not a trainer checkpoint (no .metadata, no trainer_state.pt)")
    if missing == ["model/config.json"]:
        raise CheckpointError(f"{path}: written before checkpoints carried the model's config and tokenizer "
                              "(no model/); evaluate the run's final/ instead")
    if missing:
        raise CheckpointError(f"{path}: an incomplete checkpoint (no {', '.join(missing)})")


def checkpoint_step(path: str) -> int:
    """The step a checkpoint was taken after: its name, as the trainer gives it, or for one
    renamed since, its trainer_state.pt."""
    name = re.fullmatch(r"step-(\d+)", os.path.basename(os.path.normpath(path)))
    return int(name[1]) if name else torch.load(os.path.join(path, "trainer_state.pt"), weights_only=False)["step"]


def final_step(run_dir: str) -> int | str:
    """The step whose policy the run's final/ holds: a run ends with a checkpoint of its
    last step, then final/, so the newest checkpoint's if final/ is newer; else unknown
    ("final": its checkpoints are gone, or a later run went on past it)."""
    saved = checkpoints(run_dir)
    if saved and os.path.getmtime(os.path.join(run_dir, "final")) >= os.path.getmtime(saved[max(saved)]):
        return max(saved)
    return "final"


def latest(run_dir: str) -> tuple[str, int | str]:
    """A run's newest weights, as (directory, step): final/, unless a checkpoint was written
    after it (the run resumed past an earlier end and goes on); else the newest checkpoint."""
    saved, final = checkpoints(run_dir), os.path.join(run_dir, "final")
    if os.path.isdir(final) and (final_step(run_dir) != "final" or not saved):
        return final, final_step(run_dir)
    if not saved:
        raise CheckpointError(f"{run_dir}: a run directory with no complete checkpoint and no final/ yet")
    return saved[max(saved)], max(saved)


def default_out(checkpoint: str) -> str:
    """RUN/exports/step-N: outside checkpoints/, so an export outlives its checkpoint (the
    trainer keeps only the newest --keep_checkpoints) and is never taken for one."""
    return os.path.join(run_of(checkpoint), "exports", os.path.basename(os.path.normpath(checkpoint)))


def run_dtype(checkpoint: str, config) -> torch.dtype:
    """The dtype the run's engines were given (its --dtype); `auto`: the model config's."""
    with open(os.path.join(checkpoint, "config.json")) as f:  # the trainer's run config, not an HF one
        dtype = json.load(f)["config"]["dtype"]
    return config.dtype if dtype == "auto" else getattr(torch, dtype)


def read_weights(checkpoint: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The model's part of a checkpoint as whole tensors of `dtype`, by their HF names (the
    checkpoint's are "model." + the policy's "lm." + those): DCP fills each from the shards
    of however many trainers wrote it, casting as it copies, in this process alone."""
    stored = dcp.FileSystemReader(checkpoint).read_metadata().state_dict_metadata
    state = {"model": {k.removeprefix("model."): torch.empty(m.size, dtype=dtype)
                       for k, m in stored.items() if k.startswith("model.")}}
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(state, checkpoint_id=checkpoint, no_dist=True)
    return {k.removeprefix("lm."): v for k, v in state["model"].items()}


def export(checkpoint: str, out: str) -> torch.dtype:
    """Write the checkpoint's model as an HF-format directory `out` (which must not exist,
    or be empty): weights in the run's dtype, the model config and tokenizer. Written
    aside and renamed, so `out` exists only complete. Returns the dtype."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    check_checkpoint(checkpoint)
    if os.path.exists(out) and not (os.path.isdir(out) and not os.listdir(out)):
        raise CheckpointError(f"{out}: exists and is not an empty directory (choose another --out)")
    model_dir = os.path.join(checkpoint, "model")
    config = AutoConfig.from_pretrained(model_dir)
    dtype = run_dtype(checkpoint, config)
    with torch.device("meta"):  # the model without weights of its own: the checkpoint's take their places
        lm = AutoModelForCausalLM.from_config(config, dtype=dtype)
    lm.load_state_dict(read_weights(checkpoint, dtype), assign=True)  # strict: every name, no other
    lm.tie_weights()  # a tied LM head is the embedding again, saved once, as in final/
    lm.generation_config = GenerationConfig.from_pretrained(model_dir)  # its stop tokens, which vLLM reads
    tmp = f"{os.path.normpath(out)}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    lm.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(tmp)
    os.replace(tmp, out)
    return dtype


def cached_export(checkpoint: str) -> str:
    """The checkpoint's export at default_out, made on first use (complete if there at all)."""
    out = default_out(checkpoint)
    if not os.path.isdir(out):
        dtype = export(checkpoint, out)
        print(f"exported {checkpoint} to {out} ({str(dtype).removeprefix('torch.')})", flush=True)
    return out


def main(argv=None):
    parser = FlagParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a run's checkpoints/step-N")
    parser.add_argument("--out", default="", help="the directory to write; must not exist, or be empty "
                                                  "(default: RUN/exports/step-N, where eval/evaluate.py looks)")
    args = parser.parse_args(argv)
    out = args.out or default_out(args.checkpoint)
    try:
        dtype = export(args.checkpoint, out)
    except CheckpointError as e:  # nothing was written: every check comes first
        parser.error(str(e))
    print(f"{args.checkpoint} (step {checkpoint_step(args.checkpoint)}) -> {out}: {str(dtype).removeprefix('torch.')} "
          "weights, config and tokenizer", flush=True)


if __name__ == "__main__":
    main()
