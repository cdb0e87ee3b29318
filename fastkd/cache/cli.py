"""``fastkd cache-teacher``: build a :class:`fastkd.cache.TeacherCache` from a Hugging Face causal LM.

The teacher is a local model directory (``--model``; nothing is downloaded) or a config file
(``--config config.json``: a randomly initialised model, for tests and benchmarks). Examples come from a
text file (one example per line; needs a tokenizer: ``--tokenizer`` or the model directory) or a token
file: ``.jsonl`` (a list of ids, or ``{"input_ids": [...]}`` per line) or ``.pt`` (a 2-D tensor or a list
of 1-D tensors). For every example the teacher's final hidden states go through its LM head chunk by chunk
(:meth:`TeacherCacheWriter.add_from_hidden`), so (tokens, V) logits never exist. Position t of an example
stores the teacher's distribution for the token after t (the usual causal-LM shift is the trainer's job).

The run is resumable (``--resume`` continues after the last complete shard) and reports bytes per token.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

import torch


def plain_text(rst: str) -> str:
    """reST inline markup as plain text for ``--help``: ``:meth:`~a.B.c``` → ``B.c``, ````x```` → ``x``."""
    def role(m: re.Match) -> str:
        name = m.group(2).strip()
        return name.rsplit(".", 1)[-1] if m.group(1) else name  # "~" shows the last component only

    text = re.sub(r":[a-z]+:`(~?)([^`<]*?)(?:\s*<[^>]*>)?`", role, rst)
    text = re.sub(r"``([^`]*)``", r"\1", text)
    return re.sub(r"`([^`]*)`", r"\1", text)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "cache-teacher",
        help="build a sparse teacher cache (top-k log-probs or samples) from a causal LM",
        description=plain_text(__doc__.split("\n\n")[1]) if __doc__ else None,
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="local Hugging Face model directory (no downloads)")
    src.add_argument("--config", help="config.json of a model to build with random weights (--seed)")
    p.add_argument("--data", required=True, help=".txt (one example per line), .jsonl or .pt token file")
    p.add_argument("--out", required=True, help="cache directory")
    p.add_argument("--tokenizer", default=None, help="local tokenizer directory (default: --model)")
    sel = p.add_mutually_exclusive_group()
    sel.add_argument("--k", type=int, default=None, help="top-k ids per token (a top-k cache instead of samples)")
    sel.add_argument("--samples", type=int, default=None,
                     help="draws per token (Random-Sampling KD; default 16 when --k is not given, docs/sparse.md)")
    p.add_argument("--temperature", type=float, default=1.0, help="teacher temperature of the stored targets")
    p.add_argument("--values", default=None, choices=("logprobs", "counts", "hidden"),
                   help="hidden: store the teacher's final hidden states + its LM head once (exact dense KD; "
                        "H*2 bytes/token in bf16); default from --k / --samples")
    p.add_argument("--temperatures", default=None,
                   help="comma-separated temperatures whose log-normaliser and tail a top-k cache also stores "
                        "(re-temperable: cache.get(i, temperature=...)); e.g. 1,2")
    p.add_argument("--max-length", type=int, default=1024, help="truncate examples to this many tokens")
    p.add_argument("--batch-size", type=int, default=4, help="examples per teacher forward")
    p.add_argument("--chunk-size", type=int, default=256, help="tokens per LM-head chunk")
    p.add_argument(
        "--value-dtype", default=None, help="float16 (default) / bfloat16 / float32; counts: uint8"
    )
    p.add_argument("--id-format", default="auto", help="auto / int16 / uint16 / packed / int32")
    p.add_argument("--shard-tokens", type=int, default=1 << 18, help="tokens per shard")
    p.add_argument("--no-tail", action="store_true", help="do not store the tail mass")
    p.add_argument("--resume", action="store_true", help="continue an interrupted cache in --out")
    p.add_argument("--limit", type=int, default=None, help="stop after this many examples")
    p.add_argument("--seed", type=int, default=0, help="seed of random weights and of sampling")
    p.add_argument("--device", default=None, help="cpu / cuda (default: cuda when available)")
    p.add_argument(
        "--dtype", default="float32", choices=("float32", "bfloat16", "float16"), help="teacher weights dtype"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def load_examples(path: str | Path, tokenizer_path: str | None, max_length: int) -> list[list[int]]:
    """Token id lists from a .txt / .jsonl / .pt file (see the module docstring)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"--data {path} does not exist")
    if path.suffix == ".pt":
        obj = torch.load(path, map_location="cpu", weights_only=True)
        rows = [r for r in obj] if isinstance(obj, torch.Tensor) and obj.dim() == 2 else list(obj)
        examples = [torch.as_tensor(r).long().tolist() for r in rows]
    elif path.suffix == ".jsonl":
        examples = []
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            obj = json.loads(line)
            ids = obj["input_ids"] if isinstance(obj, dict) else obj
            if not isinstance(ids, list) or not all(isinstance(i, int) for i in ids):
                raise ValueError(f"{path}:{n}: expected a list of token ids or {{'input_ids': [...]}}")
            examples.append(ids)
    else:
        if tokenizer_path is None:
            raise ValueError("a text --data file needs a tokenizer: pass --tokenizer DIR (or --model DIR)")
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(tokenizer_path, local_files_only=True)
        lines = [x for x in path.read_text().splitlines() if x.strip()]
        examples = [tok(x)["input_ids"] for x in lines]
    return [e[:max_length] for e in examples if len(e)]


def load_teacher(args: argparse.Namespace, device: torch.device) -> Any:
    from transformers import AutoConfig, AutoModelForCausalLM

    dtype = getattr(torch, args.dtype)
    if args.model:
        model = AutoModelForCausalLM.from_pretrained(args.model, local_files_only=True, dtype=dtype)
    else:
        cfg = AutoConfig.from_pretrained(args.config, local_files_only=True)
        torch.manual_seed(args.seed)
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return model.to(device).eval()


@torch.no_grad()
def build_cache(
    model: Any,
    examples: list[list[int]],
    out: str | Path,
    *,
    k: int | None = None,
    samples: int | None = None,
    temperature: float = 1.0,
    batch_size: int = 4,
    chunk_size: int = 256,
    value_dtype: str | None = None,
    id_format: str = "auto",
    shard_tokens: int = 1 << 18,
    store_tail: bool = True,
    resume: bool = False,
    seed: int = 0,
    progress: bool = True,
    meta: dict[str, Any] | None = None,
    hidden: bool = False,
    temperatures: tuple[float, ...] = (),
) -> dict[str, Any]:
    """Run the teacher over ``examples`` and write the cache; returns a summary dict.

    ``hidden=True``: a hidden-state cache (final hidden states + the LM head, ``softcap`` and ``logit_scale``
    from the config); ``temperatures``: a re-temperable top-k cache."""
    from fastkd.cache.reader import TeacherCache
    from fastkd.cache.writer import TeacherCacheWriter

    head = model.get_output_embeddings()
    vocab = head.weight.shape[0]
    softcap = getattr(model.config, "final_logit_softcapping", None)
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model.base_model
    store_hidden = hidden  # ``hidden`` is reused below for the teacher's hidden states
    if store_hidden:
        if k is not None or samples is not None or temperatures:
            raise ValueError("--values hidden takes no --k / --samples / --temperatures (it is exact at any T)")
        k, samples = 1, None  # unused by the hidden-state writer
    if k is None and samples is None:  # default: 16 teacher draws per token (48 B/token), see docs/sparse.md
        samples = 16
    values = "hidden" if hidden else "counts" if samples else "logprobs"
    slots = samples or k
    extra: dict[str, Any] = {"temperatures": tuple(temperatures)}
    if hidden:
        bias = getattr(head, "bias", None)
        extra = {"lm_head": head.weight.detach(), "lm_head_bias": None if bias is None else bias.detach(),
                 "softcap": softcap, "logit_scale": getattr(model.config, "logit_scale", None)}
    writer = TeacherCacheWriter(
        out,
        vocab_size=vocab,
        k=None if hidden else slots,
        values=values,
        value_dtype=value_dtype,
        id_format=id_format,
        store_tail=store_tail,
        shard_tokens=shard_tokens,
        resume=resume,
        meta={**(meta or {}), "temperature": temperature, "mode": values if hidden else "sampled" if samples
              else "topk"},
        **extra,
    )
    start = writer.n_examples
    device = head.weight.device
    gen = torch.Generator(device=device).manual_seed(seed + start)
    todo = examples[start:]
    t0 = time.perf_counter()
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("caching teacher"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with writer, Progress(*columns, disable=not progress, transient=True) as bar:
        task = bar.add_task("cache", total=len(examples), completed=start)
        for b in range(0, len(todo), batch_size):
            batch = todo[b : b + batch_size]
            length = max(len(e) for e in batch)
            ids = torch.zeros(len(batch), length, dtype=torch.long)
            att = torch.zeros(len(batch), length, dtype=torch.long)
            for i, e in enumerate(batch):
                ids[i, : len(e)] = torch.tensor(e)
                att[i, : len(e)] = 1
            hidden = decoder(input_ids=ids.to(device), attention_mask=att.to(device)).last_hidden_state
            for i, e in enumerate(batch):
                writer.add_from_hidden(
                    hidden[i, : len(e)],
                    head.weight,
                    getattr(head, "bias", None),
                    temperature=temperature,
                    chunk_size=chunk_size,
                    input_ids=torch.tensor(e),
                    generator=gen,
                    softcap=softcap,
                )
            bar.advance(task, len(batch))
    cache = TeacherCache(out)
    return {
        "examples": len(cache),
        "tokens": cache.n_tokens,
        "new_examples": len(todo),
        "bytes_per_token": cache.bytes_per_token(),
        "seconds": time.perf_counter() - t0,
        "k": None if store_hidden else slots,
        "values": values,
        "id_format": cache.index.get("id_format"),
        "vocab_size": vocab,
    }


def run(args: argparse.Namespace) -> int:
    try:
        if args.k is not None and args.k <= 0 or args.samples is not None and args.samples <= 0:
            raise ValueError("--k and --samples must be positive")
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        examples = load_examples(args.data, args.tokenizer or args.model, args.max_length)
        if args.limit is not None:
            examples = examples[: args.limit]
        temps = tuple(float(x) for x in args.temperatures.split(",")) if args.temperatures else ()
        if args.values == "logprobs" and args.samples is not None or args.values == "counts" and args.k is not None:
            raise ValueError(f"--values {args.values} contradicts --k / --samples")
        if args.values == "logprobs" and args.k is None:
            args.k = 32
        if args.values == "counts" and args.samples is None:
            args.samples = 16
        model = load_teacher(args, device)
        summary = build_cache(
            model,
            examples,
            args.out,
            k=args.k,
            samples=args.samples,
            temperature=args.temperature,
            batch_size=args.batch_size,
            chunk_size=args.chunk_size,
            value_dtype=args.value_dtype,
            id_format=args.id_format,
            shard_tokens=args.shard_tokens,
            store_tail=not args.no_tail,
            resume=args.resume,
            seed=args.seed,
            progress=not args.no_progress,
            meta={"teacher": args.model or args.config, "data": str(args.data)},
            hidden=args.values == "hidden",
            temperatures=temps,
        )
    except (OSError, ValueError, RuntimeError) as exc:
        print(f"fastkd cache-teacher: error: {exc}", file=sys.stderr)
        return 1
    print(
        f"wrote {summary['new_examples']} examples ({summary['examples']} in total, "
        f"{summary['tokens']} tokens) "
        f"to {args.out}: K={summary['k']} {summary['values']}, ids {summary['id_format']} "
        f"(V={summary['vocab_size']}), {summary['bytes_per_token']:.1f} bytes/token, "
        f"{summary['seconds']:.1f} s"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    """Standalone entry point: ``python -m fastkd.cache.cli ...`` (same arguments as the subcommand)."""
    parser = argparse.ArgumentParser(prog="fastkd")
    sub = parser.add_subparsers(dest="command", required=True)
    add_parser(sub)
    return run(parser.parse_args(["cache-teacher", *(argv if argv is not None else sys.argv[1:])]))


if __name__ == "__main__":
    raise SystemExit(main())
