"""The keyword arguments the public losses share: each one's default, annotation and documentation, once.

:data:`KEYWORDS` holds one :class:`Keyword` per shared name; a :data:`PIECES` entry documents one name or a
group of names that read together (``labels, ignore_index, mask``). The hyperparameters (``beta``, ``alpha``,
``mu``, ``t``) are documented from the divergence table (:mod:`fastkd.core.divergences`). A public function
takes the pieces into its docstring with :func:`shared_doc` (the ``{shared}`` marker in its Args section);
:func:`shared_keywords` generates the public function, its shared keyword parameters from :data:`KEYWORDS`
(every public loss of the distill and sparse families, the vocabulary-parallel ones included), so adding a
shared option is one entry here (a new hyperparameter: one row of the divergence table) plus its tests.
tests/core/test_keywords.py checks that every public function's shared keywords have these defaults and are
documented once, from here.
"""

from __future__ import annotations

import inspect
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from fastkd.core.divergences import HYPER_NAMES, HYPERS, TABLE

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class Keyword:
    """One shared keyword parameter: its name, default and annotation (as written in a signature)."""

    name: str
    default: Any
    annotation: str


KEYWORDS: dict[str, Keyword] = {k.name: k for k in (
    Keyword("temperature", 1.0, "float"),
    Keyword("scale_by_t2", False, "bool"),
    Keyword("labels", None, "torch.Tensor | None"),
    Keyword("ignore_index", -100, "int"),
    Keyword("mask", None, "torch.Tensor | None"),
    Keyword("reduction", "mean", "str"),
    Keyword("num_items_in_batch", None, "int | float | torch.Tensor | None"),
    Keyword("ce_weight", 0.0, "float"),
    Keyword("vocab_size", None, "int | None"),
    *(Keyword(name, None, "float | None") for name in HYPER_NAMES),
    Keyword("chunk_size", None, "int | None"),
    Keyword("backend", "auto", "str"),
    Keyword("return_stats", False, "bool"),
)}


def _hyper_doc(names: tuple[str, ...]) -> str:
    """The hyperparameters' entry for ``names``, from the table: each canonical spec, then the rows that give
    one of them a spec of their own (ab)."""
    canon = [f"{n} = {HYPERS[n].doc} ({HYPERS[n].default:g})" for n in names]
    own = [f"{row.name}: " + ", ".join(f"{h.name} = {h.doc.removeprefix(row.name + ': ')} ({h.default:g})"
                                       for h in row.hypers)
           for row in TABLE if any(h is not HYPERS[h.name] and h.name in names for h in row.hypers)]
    return ("the divergence's hyperparameters (``fastkd.core.divergences.TABLE``; None = the divergence's "
            f"default): {'; '.join(canon + own)}.")


# (names, text): the Args entry ``names: text`` (text wrapped to the docstring's width); a function that takes
# only some names of a group gets the entry for those.
PIECES: tuple[tuple[tuple[str, ...], str], ...] = (
    (("temperature",), "T > 0; both sides' logits are divided by T before the softmax."),
    (("scale_by_t2",), "multiply the divergence term by T² (Hinton)."),
    (("labels", "ignore_index", "mask"),
     "exclude tokens (``labels == ignore_index`` or ``mask == False``)."),
    (("reduction",), '"mean" (over kept tokens), "sum" or "none" (per token, 0 where excluded).'),
    (("num_items_in_batch",), "when given, the sum is divided by it (HF gradient accumulation)."),
    (("ce_weight",), "adds ``ce_weight × cross_entropy(student logits, labels)`` (un-tempered) per token."),
    (("vocab_size",), "use only the first ``vocab_size`` columns of both sides (vocabulary padding)."),
    (HYPER_NAMES, ""),  # written for the names a function takes: _hyper_doc
    (("backend",), '"auto", "torch", "triton" or "cuda" (``FASTKD_BACKEND`` when "auto").'),
)
PIECE_OF: dict[str, tuple[str, ...]] = {n: names for names, _ in PIECES for n in names}

# The shared keywords each family's public losses document from here.
DENSE_KEYWORDS = ("temperature", "scale_by_t2", "labels", "ignore_index", "mask", "reduction", "num_items_in_batch",
                  "ce_weight", "vocab_size", *HYPER_NAMES, "backend")
SPARSE_KEYWORDS = ("scale_by_t2", "beta", "labels", "ignore_index", "mask", "reduction", "num_items_in_batch",
                   "backend")
VOCAB_PARALLEL_KEYWORDS = ("temperature", "scale_by_t2", "labels", "ignore_index", "mask", "reduction",
                           "num_items_in_batch", "ce_weight", "beta", "chunk_size", "backend")

# The shared keywords that define the token weights (:func:`fastkd.core.checks.token_weights`).
TOKEN_KEYWORDS = ("labels", "ignore_index", "mask", "reduction", "num_items_in_batch")
# The shared keywords a dense loss's params record takes (:func:`fastkd.core.params.make_params`).
PARAM_KEYWORDS = ("temperature", "scale_by_t2", "ce_weight", *HYPER_NAMES)


def pick(options: dict[str, Any], names: tuple[str, ...]) -> dict[str, Any]:
    """The entries of a call's shared ``options`` named in ``names`` (those of them the call takes)."""
    return {n: options[n] for n in names if n in options}


def args_doc(*names: str, indent: int = 8) -> str:
    """The Args entries documenting ``names`` (each piece once, in the order first named), indented; a name
    without a piece (``chunk_size``, ``return_stats``: their meaning differs by family) is left to the function."""
    seen: list[tuple[str, ...]] = []
    for n in names:
        group = PIECE_OF.get(n)
        if group is not None and group not in seen:
            seen.append(group)
    text = dict(PIECES)
    out = []
    for group in seen:
        taken = tuple(n for n in group if n in names)
        body = _hyper_doc(taken) if group == HYPER_NAMES else text[group]
        head = " " * indent + ", ".join(taken) + ": "
        out.append(textwrap.fill(body, width=116, initial_indent=head,
                                 subsequent_indent=" " * (indent + 4), break_on_hyphens=False))
    return "\n".join(out)


def shared_doc(*names: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Replace the ``{shared}`` line of the function's docstring with :func:`args_doc` of ``names``."""

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        doc = fn.__doc__ or ""
        lines = doc.split("\n")
        at = [i for i, line in enumerate(lines) if line.strip() == "{shared}"]
        if len(at) != 1:
            raise ValueError(f"{fn.__qualname__}'s docstring needs one '{{shared}}' line")
        indent = len(lines[at[0]]) - len(lines[at[0]].lstrip())
        lines[at[0]] = args_doc(*names, indent=indent)
        fn.__doc__ = "\n".join(lines)
        fn.__shared_keywords__ = names
        return fn

    return deco


def shared_keywords(*names: str, keywords: dict[str, Keyword] | None = None,
                    pass_through: bool = False) -> Callable[[F], F]:
    """Give ``fn`` (which takes ``**options``) the keyword-only parameters ``names`` of :data:`KEYWORDS`.

    The public function returned is generated, as :mod:`dataclasses` generates ``__init__``: a real Python
    function whose signature is ``fn``'s own parameters followed by ``names`` with their shared defaults and
    annotations (``inspect.signature``, ``help``, an unknown keyword is Python's own TypeError, ``torch.compile``
    traces it as written code). It passes every argument on to ``fn``, the shared keywords in ``options``. So a
    new shared keyword is one :data:`KEYWORDS` entry (and its piece): every loss built with it takes it.

    ``keywords``: another family's keyword set instead of :data:`KEYWORDS` (its functions document them
    themselves: no ``{shared}`` pieces). ``pass_through``: the generated function keeps a ``**`` parameter too,
    whose entries reach ``options`` beside the named ones (keywords forwarded to another loss).
    """
    table = KEYWORDS if keywords is None else keywords

    def deco(fn: F) -> F:
        own = inspect.signature(fn)
        kinds = {p.kind for p in own.parameters.values()}
        if inspect.Parameter.VAR_KEYWORD not in kinds:
            raise TypeError(f"{fn.__qualname__} must take **options to receive the shared keywords")
        if kinds & {inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.VAR_POSITIONAL}:
            raise TypeError(f"{fn.__qualname__}: positional-only and *args parameters are not supported")
        clash = [n for n in names if n in own.parameters]
        if clash:
            raise TypeError(f"{fn.__qualname__} declares shared keywords {clash} itself")
        params = [p for p in own.parameters.values() if p.kind is not p.VAR_KEYWORD]
        params += [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=table[n].default,
                                     annotation=table[n].annotation) for n in names]
        if pass_through:
            params += [p for p in own.parameters.values() if p.kind is p.VAR_KEYWORD]
        sig = own.replace(parameters=params)
        namespace: dict[str, Any] = {"_impl": fn}
        head, call = [], []
        for p in params:
            if p.kind is p.KEYWORD_ONLY and "*" not in head:
                head.append("*")
            default = ""
            if p.default is not p.empty:
                namespace[f"_default_{p.name}"] = p.default
                default = f"=_default_{p.name}"
            if p.kind is p.VAR_KEYWORD:
                head.append(f"**{p.name}")
                call.append(f"**{p.name}")
                continue
            head.append(p.name + default)
            call.append(p.name if p.kind is p.POSITIONAL_OR_KEYWORD else f"{p.name}={p.name}")
        source = f"def {fn.__name__}({', '.join(head)}):\n    return _impl({', '.join(call)})\n"
        exec(compile(source, f"<fastkd.core.docs.shared_keywords {fn.__qualname__}>", "exec"), namespace)
        public = namespace[fn.__name__]
        public.__module__, public.__qualname__, public.__doc__ = fn.__module__, fn.__qualname__, fn.__doc__
        public.__annotations__ = {p.name: p.annotation for p in params if p.annotation is not p.empty}
        if sig.return_annotation is not sig.empty:
            public.__annotations__["return"] = sig.return_annotation
        public.__impl__ = fn
        if keywords is not None:
            public.__shared_keywords__ = names
            return public
        return shared_doc(*names)(public)

    return deco
