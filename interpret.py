"""Looking inside the model: hidden states, attention, logit lens, attribution, and why a token was chosen.

The tools of this chapter stand on two files of their own, which a first reading can take one
at a time:

* layers.py: loading a model a layer range at a time, running it block by block, and the forward
  pass written out so that the residual stream and every head's attention weights are kept;
* attribution.py: which input tokens pushed a target logit up or down (gradient x input,
  integrated gradients).

Here, each using only what stands above it:

1. **Logit lens** (nostalgebraist 2020, "interpreting GPT: the logit lens"): read every layer's
   residual stream through the final norm and head, as if the model stopped there.
2. **Why this token.** Generate with the engine's own decode loop (`LLaMa.decode`) and show, for
   each new token, the top candidates with their probabilities from the model, after repetition
   penalty / temperature / top-k, and after top-p (`sampling.sampler_stages`), and which of them
   top-k or top-p cut.
3. **Tables and pictures** (matplotlib, optional: only for PNG files).
4. **Command line**: ``python interpret.py hidden|attention|lens|attribute|why --help``.

Every name of layers.py and attribution.py is importable from here too (`interpret.trace`,
`interpret.integrated_gradients`, ...), as before they had files of their own.

Shape legend: T tokens, C model dim, H query heads, L layers, V vocabulary.
"""

from __future__ import annotations

import argparse
import math
import sys
import textwrap
from dataclasses import dataclass, replace
from pathlib import Path
from typing import AbstractSet, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from atomic import atomic_path
from attribution import (  # noqa: F401 (re-exported: interpret.<name> as before the split)
    COMPLETENESS_TOLERANCE,
    DEFAULT_IG_STEPS,
    FAST_LINEAR_TYPES,
    IG_ROWS_PER_PASS,
    GradientTimesInput,
    IntegratedGradients,
    check_differentiable,
    check_target,
    check_token_id,
    gradient_x_input,
    input_embeddings,
    integrated_gradients,
    mean_embedding_baseline,
    midpoints,
    target_logit,
    token_baseline,
    with_first_token_kept,
    zero_baseline,
)
from checkpoint import CheckpointError, choose_dtype, load_transformer
from inference import DEFAULT_MAX_SEQ_LEN, LLaMa
from layers import (  # noqa: F401 (re-exported: interpret.<name> as before the split)
    EMBEDDING,
    FINAL_NORM,
    HEAD,
    LAST_POSITION,
    STUDY_BATCH_SIZE,
    LayerLoader,
    Positions,
    Trace,
    apply_head,
    attention_maps,
    attention_with_weights,
    block_with_weights,
    check_layer,
    check_length,
    check_position,
    check_tokens,
    embed,
    hidden_states,
    is_loaded,
    positions_for,
    require_loaded,
    residual_stream,
    run_block,
    stepwise_logits,
    streamed_logits,
    token_tensor,
    trace,
)
from model import Transformer
from sampling import DEFAULT_TEMPERATURE, DEFAULT_TOP_P, NO_REPETITION_PENALTY, SamplingParams, sampler_stages
from tokenizer import Tokenizer, TokenizerFileError

# float32 by default: bf16 rounding would swamp small attributions and the completeness check.
DEFAULT_STUDY_DTYPE = "float32"
DEFAULT_SHOW = 5  # tokens shown per layer (lens) or per step (why)
DEFAULT_WHY_GEN_LEN = 8
DEFAULT_TEXT = "The capital of France is Paris. The capital of Germany is"
MATPLOTLIB_HINT = "PNG output needs matplotlib: pip install matplotlib"
PNG_DPI = 80  # pixels per inch of the saved pictures: readable labels, small files
MIN_FIGURE_WIDTH = 5.0  # inches: room for a title and a legend however few the tokens
TITLE_CHARS_PER_INCH = 11  # about how many characters of a 10-point title fit in an inch


class MissingDependencyError(RuntimeError):
    """An optional package is needed for what was asked; the message says how to install it."""


# --------------------------------------------------------------------------------------------
# 1. Logit lens
# --------------------------------------------------------------------------------------------


@dataclass
class LensRow:
    """What the model would predict if it stopped after `layer` blocks (0 = right after the embedding)."""

    layer: int
    token_ids: list[int]  # top-k, most likely first
    probs: list[float]


@torch.no_grad()
def lens_probs(model: Transformer, tokens: Sequence[int], position: int = LAST_POSITION) -> torch.Tensor:
    """Next-token probabilities (L+1, V) read from every layer's residual stream at `position`."""
    position = check_position(position, len(tokens))
    residual = trace(model, tokens).hidden[:, position]  # (L+1, C)
    logits = apply_head(model, residual)  # (L+1, V): the same norm and head at every depth
    return torch.softmax(logits, dim=-1)


def logit_lens(
    model: Transformer, tokens: Sequence[int], k: int = DEFAULT_SHOW, position: int = LAST_POSITION
) -> list[LensRow]:
    """The top-k next tokens at `position`, read through the final norm and head after every layer."""
    if k < 1:
        raise ValueError(f"top-k must be >= 1, got {k}")
    probs = lens_probs(model, tokens, position)
    top = torch.topk(probs, min(k, probs.shape[-1]), dim=-1)
    return [LensRow(layer, ids.tolist(), p.tolist()) for layer, (p, ids) in enumerate(zip(top.values, top.indices))]


# --------------------------------------------------------------------------------------------
# 2. Why this token: the sampler's view of each step of a generation
# --------------------------------------------------------------------------------------------


@dataclass
class Candidate:
    token: int
    prob: float  # the model's own probability: softmax(logits)
    prob_shaped: float  # after repetition penalty, temperature and top-k (greedy: 1 for the argmax)
    prob_final: float  # after top-p, renormalised: what the draw used
    cut: Optional[str]  # "top-k" or "top-p" if that filter removed it, else None


@dataclass
class WhyStep:
    position: int  # where the chosen token goes in the sequence
    chosen: int
    candidates: list[Candidate]  # the most likely by the model, plus the chosen token if it is not among them
    kept: int  # how many tokens could have been drawn


@dataclass
class SamplerView:
    """The distributions `sampling.sample_next_token` goes through, for one row of logits (V,)."""

    probs: torch.Tensor  # (V,) softmax of the raw logits
    shaped: torch.Tensor  # (V,) after repetition penalty, temperature and top-k
    final: torch.Tensor  # (V,) after top-p: the distribution drawn from
    cut_by_top_k: torch.Tensor  # (V,) bool
    cut_by_top_p: torch.Tensor  # (V,) bool


@torch.no_grad()
def sampler_view(logits: torch.Tensor, params: SamplingParams, seen: Optional[torch.Tensor]) -> SamplerView:
    """The stages of `sampling.sample` (see `sampling.sampler_stages`) for one row of logits (V,)."""
    probs = torch.softmax(logits.float(), dim=-1)
    stages = sampler_stages(logits[None], params, seen[None] if seen is not None else None)
    nothing_cut = torch.zeros_like(probs, dtype=torch.bool)
    if params.greedy:  # all the mass on the argmax; nothing is filtered
        one_hot = F.one_hot(torch.argmax(stages.logits[0]), logits.shape[-1]).float()
        return SamplerView(probs, one_hot, one_hot, nothing_cut, nothing_cut)
    cut_by_top_k = torch.isinf(stages.top_k_logits[0]) & ~torch.isinf(stages.logits[0])
    shaped, final = stages.probs[0], stages.final[0]
    return SamplerView(probs, shaped, final, cut_by_top_k, (shaped > 0) & (final == 0))


def why(
    llama: LLaMa,
    prompt_tokens: Sequence[int],
    stop_tokens: AbstractSet[int],
    max_gen_len: int = DEFAULT_WHY_GEN_LEN,
    params: Optional[SamplingParams] = None,
    show: int = DEFAULT_SHOW,
    seed: Optional[int] = None,
) -> list[WhyStep]:
    """Generate with the engine's own decode loop (the same model calls, the same sampler: the same
    seed gives the same tokens as `LLaMa.generate`) and explain every step: the `show` most likely
    candidates.

    params: temperature, top-p, top-k, repetition penalty (default: `SamplingParams()`, Meta's);
    seed, if given, replaces params.seed.
    """
    if isinstance(llama, Transformer):
        raise TypeError("why() takes the LLaMa now (llama, not llama.model): it generates with LLaMa.decode")
    params = SamplingParams() if params is None else params
    if seed is not None:
        params = replace(params, seed=seed)
    if max_gen_len < 1 or show < 1:
        raise ValueError(f"max_gen_len and show must be >= 1, got {max_gen_len} and {show}")
    steps = []
    for step in llama.decode([list(prompt_tokens)], max_gen_len, params):
        chosen = int(step.tokens[0])
        view = sampler_view(step.logits[0], params, step.seen[0] if step.seen is not None else None)
        top = torch.topk(view.probs, min(show, view.probs.shape[-1])).indices.tolist()
        shown = top + ([chosen] if chosen not in top else [])
        candidates = [
            Candidate(t, float(view.probs[t]), float(view.shaped[t]), float(view.final[t]),
                      cut="top-k" if view.cut_by_top_k[t] else "top-p" if view.cut_by_top_p[t] else None)
            for t in shown
        ]
        steps.append(WhyStep(step.position, chosen, candidates, int((view.final > 0).sum())))
        if chosen in stop_tokens:
            break
    return steps


# --------------------------------------------------------------------------------------------
# 3. Tables and pictures
# --------------------------------------------------------------------------------------------


def token_label(tokenizer: Tokenizer, token: int) -> str:
    """A token as it sits in the vocabulary, quoted so that spaces and newlines show: ' Paris', '\\n'."""
    return repr(tokenizer.id_to_piece(token))


def layer_name(layer: int) -> str:
    """Residual stream index -> words: 0 is the embedding, i+1 is after block i."""
    return "embedding" if layer == 0 else f"block {layer - 1}"


def format_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(header, widths)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(lines)


def format_hidden(hidden: torch.Tensor, labels: list[str]) -> str:
    """The size (root mean square) of the residual stream at each layer and token."""
    rms = hidden.float().pow(2).mean(dim=-1).sqrt()  # (L+1, T)
    rows = [[layer_name(i)] + [f"{v:.3g}" for v in rms[i].tolist()] for i in range(rms.shape[0])]
    return format_table(["RMS of residual"] + labels, rows)


def format_attention(weights: torch.Tensor, labels: list[str]) -> str:
    """A (T, T) attention matrix as text: rows are queries, columns keys."""
    rows = [[labels[i]] + [f"{w:.2f}" if j <= i else "" for j, w in enumerate(weights[i].tolist())]
            for i in range(weights.shape[0])]
    return format_table(["query \\ key"] + labels, rows)


def format_lens(rows: list[LensRow], tokenizer: Tokenizer) -> str:
    table = [[layer_name(r.layer)] + [f"{token_label(tokenizer, t)} {p:.2f}" for t, p in zip(r.token_ids, r.probs)]
             for r in rows]
    k = len(rows[0].token_ids)
    return format_table(["layer"] + [f"top {i + 1}" for i in range(k)], table)


def format_attribution(
    labels: list[str], gxi: Optional[GradientTimesInput], ig: Optional[IntegratedGradients]
) -> str:
    header = ["position", "token"] + (["grad x input"] if gxi else []) + (["integrated gradients"] if ig else [])
    rows = []
    for i, label in enumerate(labels):
        row = [str(i), label]
        row += [f"{float(gxi.scores[i]):+.4f}"] if gxi else []
        row += [f"{float(ig.scores[i]):+.4f}"] if ig else []
        rows.append(row)
    text = format_table(header, rows)
    if ig is not None:
        text += (f"\nintegrated gradients, {ig.steps} steps: scores sum to {float(ig.scores.sum()):+.4f}; "
                 f"logit at input - at baseline = {ig.logit:+.4f} - {ig.baseline_logit:+.4f} = "
                 f"{ig.logit - ig.baseline_logit:+.4f} (completeness error {100 * ig.completeness_error:.2f}%)")
        if ig.completeness_error > COMPLETENESS_TOLERANCE:
            text += (f"\nwarning: the scores miss the logit difference by more than {100 * COMPLETENESS_TOLERANCE:g}%: "
                     f"the path is rough; raise --steps (or try another --baseline) before trusting them")
    return text


def format_why(steps: list[WhyStep], tokenizer: Tokenizer, params: SamplingParams) -> str:
    shaping, settings = ["temperature"], [f"T={params.temperature:g}"]  # the sampler's steps in use, in order
    if params.repetition_penalty != NO_REPETITION_PENALTY:
        shaping.insert(0, "penalty")
        settings.insert(0, f"repetition penalty {params.repetition_penalty:g}")
    if params.top_k is not None:
        shaping.append("top-k")
        settings.append(f"top-k {params.top_k}")
    header = ["candidate", "p (model)", f"p ({', '.join(shaping)})", "p (after top-p)", ""]
    out = []
    for step in steps:
        rule = "greedy" if params.greedy else f"{', '.join(settings)}, top-p {params.top_p:g}: {step.kept} token(s) kept"
        out.append(f"position {step.position}: chose {token_label(tokenizer, step.chosen)} ({rule})")
        rows = [[token_label(tokenizer, c.token), f"{c.prob:.4f}", f"{c.prob_shaped:.4f}", f"{c.prob_final:.4f}",
                 f"cut by {c.cut}" if c.cut else ("<- chosen" if c.token == step.chosen else "")]
                for c in step.candidates]
        out.append(format_table(header, rows))
        out.append("")
    return "\n".join(out)


def require_matplotlib():
    """matplotlib.pyplot with a file-only backend, or an error that says how to install it."""
    try:
        import matplotlib
    except ImportError:
        raise MissingDependencyError(MATPLOTLIB_HINT) from None
    matplotlib.use("Agg")  # draw into files; no display needed
    import matplotlib.pyplot as plt

    return plt


def save_attention_png(weights: torch.Tensor, labels: list[str], path: Union[str, Path], title: str) -> Path:
    """Heatmaps of attention weights (H, T, T), one panel per head; tokens label both axes."""
    plt = require_matplotlib()
    n_heads = weights.shape[0]
    cols = math.ceil(math.sqrt(n_heads))
    rows = math.ceil(n_heads / cols)
    cell = 0.3 * len(labels) + 2  # inches per panel: room for one label per token
    fig_width = max(MIN_FIGURE_WIDTH, cols * cell + 1)
    fig, axes = plt.subplots(rows, cols, figsize=(fig_width, rows * cell), squeeze=False, layout="constrained")
    for head, ax in enumerate(axes.flat):
        if head >= n_heads:
            ax.axis("off")
            continue
        image = ax.imshow(weights[head].float().cpu().numpy(), cmap="viridis", vmin=0.0, vmax=1.0)
        ax.set_title(f"head {head}" if n_heads > 1 else wrapped(title, cell), fontsize=10)
        ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=8)
        ax.set_yticks(range(len(labels)), labels, fontsize=8)
        ax.set_xlabel("key (attended to)", fontsize=8)
        ax.set_ylabel("query (attending)", fontsize=8)
    fig.colorbar(image, ax=axes, shrink=0.6, label="attention weight")
    if n_heads > 1:
        fig.suptitle(wrapped(title, fig_width))
    return save_figure(plt, fig, path)


def save_attribution_png(scores: dict[str, torch.Tensor], labels: list[str], path: Union[str, Path], title: str) -> Path:
    """Bar chart of per-token attribution scores, one group of bars per method."""
    plt = require_matplotlib()
    fig_width = max(MIN_FIGURE_WIDTH, 0.5 * len(labels) + 2)
    fig, ax = plt.subplots(figsize=(fig_width, 3.5), layout="constrained")
    width = 0.8 / len(scores)
    for i, (method, values) in enumerate(scores.items()):
        ax.bar([x + i * width for x in range(len(labels))], values.float().cpu().tolist(), width, label=method)
    ax.axhline(0.0, color="black", linewidth=0.5)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(labels))], labels, rotation=90, fontsize=8)
    ax.set_ylabel("contribution to the target logit")
    ax.set_title(wrapped(title, fig_width), fontsize=10)
    ax.legend(fontsize=8)
    return save_figure(plt, fig, path)


def wrapped(title: str, width_inches: float) -> str:
    """`title` broken into lines that fit a figure `width_inches` wide (a long title is never cut off)."""
    return textwrap.fill(title, width=max(1, int(width_inches * TITLE_CHARS_PER_INCH)))


def save_figure(plt, fig, path: Union[str, Path]) -> Path:
    """Write the figure atomically (atomic.py), in the format its file name ends in (PNG if none)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        # bbox_inches="tight": the canvas grows to hold every title and label, however long.
        fig.savefig(tmp, dpi=PNG_DPI, format=path.suffix.lstrip(".") or "png", bbox_inches="tight")
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------
# 4. Command line
# --------------------------------------------------------------------------------------------


def load_for_study(
    ckpt_dir: Union[str, Path],
    device: Union[str, torch.device, None] = None,
    dtype: Union[str, torch.dtype, None] = DEFAULT_STUDY_DTYPE,
    max_seq_len: int = DEFAULT_MAX_SEQ_LEN,
) -> LLaMa:
    """`LLaMa.build` for one text at a time, with plain nn.Linear layers (see `check_differentiable`)."""
    llama = LLaMa.build(ckpt_dir, load_model=False, max_seq_len=max_seq_len, max_batch_size=STUDY_BATCH_SIZE,
                        device=device, dtype=dtype)
    llama.model = load_transformer(ckpt_dir, llama.args, llama.device, choose_dtype(dtype, llama.device),
                                   progress=False, needs_gradients=True)
    return llama


def encode_text(llama: LLaMa, text: str) -> list[int]:
    if not text:
        raise ValueError("--text is empty: give some text to look at")
    tokens = llama.tokenizer.encode(text, bos=llama.tokenizer.add_bos, eos=False)
    if len(tokens) > llama.args.max_seq_len:
        raise ValueError(f"the text is {len(tokens)} tokens, longer than max_seq_len={llama.args.max_seq_len}: "
                         f"shorten it or raise --max-seq-len")
    return tokens


def resolve_target(llama: LLaMa, model: Transformer, tokens: list[int], position: int,
                   target_text: Optional[str], target_id: Optional[int]) -> int:
    """--target-id, or --target (text that must be exactly one token), or else the model's top prediction."""
    if target_id is not None and target_text is not None:
        raise ValueError("give --target or --target-id, not both")
    if target_id is not None:
        return check_target(model, target_id)
    if target_text is not None:
        ids = llama.tokenizer.encode(target_text, bos=False, eos=False)
        if len(ids) != 1:
            pieces = [llama.tokenizer.id_to_piece(i) for i in ids]
            raise ValueError(f"--target {target_text!r} is {len(ids)} tokens {pieces}, not one token of the "
                             f"vocabulary: give a single token (mind the leading space) or --target-id")
        return ids[0]
    return int(torch.argmax(trace(model, tokens).logits[check_position(position, len(tokens))]))


def cmd_hidden(llama: LLaMa, args: argparse.Namespace) -> str:
    tokens = encode_text(llama, args.text)
    hidden = hidden_states(llama.model, tokens)
    labels = [token_label(llama.tokenizer, t) for t in tokens]
    text = format_hidden(hidden, labels)
    if args.out:
        with atomic_path(args.out) as tmp:
            torch.save({"tokens": tokens, "hidden": hidden.cpu()}, tmp)
        text += f"\nsaved the residual stream {tuple(hidden.shape)} (layers+1, tokens, dim) to {args.out}"
    return text


def cmd_attention(llama: LLaMa, args: argparse.Namespace) -> str:
    tokens = encode_text(llama, args.text)
    check_layer(llama.model, args.layer)
    weights = attention_maps(llama.model, tokens, args.layer)  # (H, T, T)
    if args.head is not None and not 0 <= args.head < weights.shape[0]:
        raise ValueError(f"head {args.head} is out of range: layer {args.layer} has {weights.shape[0]} heads, "
                         f"0 .. {weights.shape[0] - 1}")
    labels = [token_label(llama.tokenizer, t) for t in tokens]
    chosen = weights[[args.head]] if args.head is not None else weights
    what = f"layer {args.layer}, head {args.head}" if args.head is not None else f"layer {args.layer}, mean of heads"
    text = f"attention weights, {what}\n" + format_attention(chosen.mean(dim=0), labels)
    if args.out:
        title = f"layer {args.layer}" + (f", head {args.head}" if args.head is not None else "")
        save_attention_png(chosen, labels, args.out, title)
        text += f"\nsaved the heatmap to {args.out}"
    return text


def cmd_lens(llama: LLaMa, args: argparse.Namespace) -> str:
    tokens = encode_text(llama, args.text)
    position = check_position(args.position, len(tokens))
    rows = logit_lens(llama.model, tokens, args.show, position)
    head = f"logit lens at position {position} ({token_label(llama.tokenizer, tokens[position])}): next-token guesses"
    return head + "\n" + format_lens(rows, llama.tokenizer)


def cmd_attribute(llama: LLaMa, args: argparse.Namespace) -> str:
    tokens = encode_text(llama, args.text)
    position = check_position(args.position, len(tokens))
    target = resolve_target(llama, llama.model, tokens, position, args.target, args.target_id)
    labels = [token_label(llama.tokenizer, t) for t in tokens]
    gxi = gradient_x_input(llama.model, tokens, target, position) if args.method in ("gxi", "both") else None
    ig = None
    if args.method in ("ig", "both"):
        x = input_embeddings(llama.model, tokens)
        baseline = BASELINES[args.baseline](llama.model, x, llama.tokenizer.eos_id)
        ig = integrated_gradients(llama.model, tokens, target, position, args.steps, baseline)
    title = (f"attribution of {token_label(llama.tokenizer, target)} (id {target}) as the next token "
             f"after position {position} ({labels[position]})")
    text = title + "\n" + format_attribution(labels, gxi, ig)
    if args.out:
        scores = {}
        if gxi is not None:
            scores["grad x input"] = gxi.scores
        if ig is not None:
            scores["integrated gradients"] = ig.scores
        save_attribution_png(scores, labels, args.out, title)
        text += f"\nsaved the bar chart to {args.out}"
    return text


def cmd_why(llama: LLaMa, args: argparse.Namespace) -> str:
    tokens = encode_text(llama, args.text)
    params = SamplingParams(args.temperature, args.top_p, args.top_k, args.repetition_penalty)
    steps = why(llama, tokens, llama.tokenizer.stop_tokens, args.max_gen_len, params, args.show, args.seed)
    generated = llama.tokenizer.decode([s.chosen for s in steps])
    return f"{args.text!r} -> {generated!r}\n\n" + format_why(steps, llama.tokenizer, params)


# --baseline for integrated gradients: (model, input embeddings, EOS id) -> baseline embeddings.
BASELINES = {
    "mean": lambda model, x, eos_id: mean_embedding_baseline(model, x),
    "eos": lambda model, x, eos_id: token_baseline(model, x, eos_id),
    "zero": lambda model, x, eos_id: zero_baseline(x),
}
PNG_COMMANDS = ("attention", "attribute")  # their --out is a picture
COMMANDS = {"hidden": cmd_hidden, "attention": cmd_attention, "lens": cmd_lens, "attribute": cmd_attribute, "why": cmd_why}


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    common = argparse.ArgumentParser(add_help=False, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    common.add_argument("--ckpt-dir", help="Meta checkpoint dir (default: the SmolLM2-135M-Instruct demo model, "
                        "fetched and converted once)")
    common.add_argument("--text", default=DEFAULT_TEXT, help="the text to look at (for why: the prompt)")
    common.add_argument("--device", help="cpu, cuda, cuda:N or mps (default: cuda, then mps, then cpu)")
    common.add_argument("--dtype", default=DEFAULT_STUDY_DTYPE,
                        help="float32, bfloat16 or float16; float32 keeps small attributions accurate")
    common.add_argument("--max-seq-len", type=int, default=DEFAULT_MAX_SEQ_LEN, help="longest text (and generation)")

    parser = argparse.ArgumentParser(
        description="Look inside a Llama model: the residual stream, attention, logit lens, attribution, and "
        "why a generated token was chosen. Runs on the demo model unless --ckpt-dir is given.")
    sub = parser.add_subparsers(dest="command", required=True)
    fmt = argparse.ArgumentDefaultsHelpFormatter

    p = sub.add_parser("hidden", parents=[common], formatter_class=fmt,
                       help="size of the residual stream after the embedding and after every block")
    p.add_argument("--out", help="save the hidden states (layers+1, tokens, dim) to this .pt file")

    p = sub.add_parser("attention", parents=[common], formatter_class=fmt, help="attention weights of one layer")
    p.add_argument("--layer", type=int, required=True, help="which layer (0 = first block)")
    p.add_argument("--head", type=int, help="one head only (default: every head in the PNG, their mean as text)")
    p.add_argument("--out", help="write a heatmap PNG here (needs matplotlib)")

    p = sub.add_parser("lens", parents=[common], formatter_class=fmt,
                       help="logit lens: the top next tokens read from every layer")
    p.add_argument("--show", type=int, default=DEFAULT_SHOW, help="tokens shown per layer")
    p.add_argument("--position", type=int, default=LAST_POSITION, help="which token's next-token guess (-1 = last)")

    p = sub.add_parser("attribute", parents=[common], formatter_class=fmt,
                       help="which input tokens made a target token likely (grad x input, integrated gradients)")
    p.add_argument("--target", help="the target token as text; must be one token (default: the model's top prediction)")
    p.add_argument("--target-id", type=int, help="the target token by id")
    p.add_argument("--position", type=int, default=LAST_POSITION,
                   help="the position whose next-token logit is explained (-1 = last)")
    p.add_argument("--method", choices=["gxi", "ig", "both"], default="both")
    p.add_argument("--steps", type=int, default=DEFAULT_IG_STEPS, help="integration points for integrated gradients")
    p.add_argument("--baseline", choices=list(BASELINES), default="mean",
                   help="integrated gradients start from this input (the first token always kept): the mean "
                   "embedding, the EOS token's, or zeros (poor with RMSNorm: see the README)")
    p.add_argument("--out", help="write a bar chart PNG here (needs matplotlib)")

    p = sub.add_parser("why", parents=[common], formatter_class=fmt,
                       help="generate, and show each step's candidates before and after temperature / top-p")
    p.add_argument("--max-gen-len", type=int, default=DEFAULT_WHY_GEN_LEN, help="tokens to generate")
    p.add_argument("--temperature", type=float, default=DEFAULT_TEMPERATURE, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=DEFAULT_TOP_P, help="nucleus sampling; 1 = no cut")
    p.add_argument("--top-k", type=int, help="draw only from the K most likely tokens (default: no such limit)")
    p.add_argument("--repetition-penalty", type=float, default=NO_REPETITION_PENALTY, help="1 = off")
    p.add_argument("--show", type=int, default=DEFAULT_SHOW, help="candidates shown per step")
    p.add_argument("--seed", type=int, help="random seed: with the same seed and --dtype, the same tokens as inference.py")
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    try:
        if args.command in PNG_COMMANDS and args.out:
            require_matplotlib()  # fail before loading the model, not after the work
        ckpt_dir = args.ckpt_dir
        if ckpt_dir is None:
            from demo_model import DemoModelError, ensure_demo_model  # only needed for the demo

            try:
                ckpt_dir = ensure_demo_model()
            except DemoModelError as e:  # its message says how to get the model by hand
                raise CheckpointError(str(e)) from None
        llama = load_for_study(ckpt_dir, args.device, args.dtype, args.max_seq_len)
        print(COMMANDS[args.command](llama, args))
    except (CheckpointError, TokenizerFileError, MissingDependencyError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
