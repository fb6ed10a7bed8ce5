"""Does a lambda-conditioned policy (paper Table 5, `train.lambda_conditioning`) behave differently at
different lambdas at all? On fixed cache rows, the policy's log-ratios to the cached reference at each test
lambda, and how large the lambda embedding it adds to the class token is.

    python bench/lambda_probe.py --policy data/paper/lambda/train/policy.pt --tokens data/tokens/train.zarr \
        --cache data/reflogp/ref_logp.parquet [--rows 512] [--lambdas 1,10,100,1000,8103]

A policy that has learnt the lambda dependence pushes the negatives down harder (ratio_neg more negative) the
larger lambda is, as the fixed-lambda policies do; one that has not gives the same row at every lambda. The
embedding columns say why: |e(lambda)| against |class embedding| (a tiny addition cannot change much), and
|e(lambda) - e(1)| (the part that varies with lambda). Prints a table; --against FIXED.pt,... adds the same
log-ratios for policies trained at one lambda each, for comparison (in the order of --lambdas).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import parse_args, table  # noqa: E402


def _add(parser) -> None:
    parser.add_argument("--policy", type=Path, required=True, help="the lambda-conditioned policy.pt")
    parser.add_argument("--tokens", type=Path, default=Path("data/tokens/train.zarr"))
    parser.add_argument("--cache", type=Path, default=Path("data/reflogp/ref_logp.parquet"))
    parser.add_argument("--rows", type=int, default=512, help="cache rows scored (the first conditional ones, fixed)")
    parser.add_argument("--lambdas", default="1,10,30,100,1000,8103")
    parser.add_argument("--against", default="", help="comma-separated fixed-lambda policies, one per --lambdas entry or empty")


@torch.no_grad()
def ratios(model, tokens: torch.Tensor, labels_pos, labels_neg, ref_pos, ref_neg, lam: float | None) -> tuple[float, float]:
    """Mean log p_theta(x|c) - log p_phi(x|c) and the same for c_neg over the rows (float64)."""
    from pipeline.logprobs import sequence_logp

    both = torch.cat([labels_pos, labels_neg])
    lams = None if lam is None else torch.full((len(both),), float(lam))
    logp = sequence_logp(model, both, torch.cat([tokens, tokens]), lams).double()
    pos, neg = logp.split(len(tokens))
    return float((pos - ref_pos).mean()), float((neg - ref_neg).mean())


def main() -> None:
    args = parse_args(__doc__, _add)
    from pipeline.families import load_model
    from pipeline.formats import read_ref_cache
    from pipeline.tokenstore import open_token_store

    store = open_token_store(args.tokens)
    cache, _ = read_ref_cache(args.cache, store=store)
    rows = np.flatnonzero(cache["neg_label"] != cache["label"])[: args.rows]
    tokens = torch.from_numpy(np.asarray(store.tokens[cache["row"][rows], cache["view"][rows]]).astype(np.int64))
    labels_pos = torch.from_numpy(cache["label"][rows].astype(np.int64))
    labels_neg = torch.from_numpy(cache["neg_label"][rows].astype(np.int64))
    ref_pos, ref_neg = (torch.from_numpy(cache[k][rows]) for k in ("ref_logp_pos", "ref_logp_neg"))
    _, policy = load_model(args.policy, "--policy", layout=store.attrs)
    policy.eval()
    lambdas = [float(x) for x in args.lambdas.split(",")]
    fixed = [p or None for p in args.against.split(",")] if args.against else [None] * len(lambdas)
    with torch.no_grad():  # the class token's embedding (LlamaGen; VAR conditions through AdaLN) and lambda's
        cls_norm = float(policy.cls_embedding(labels_pos).norm(dim=-1).mean()) if hasattr(policy, "cls_embedding") else float("nan")
        embed = {lam: policy.lambda_embed(torch.tensor([lam])) for lam in lambdas}
    out = []
    for lam, fixed_path in zip(lambdas, fixed, strict=True):
        pos, neg = ratios(policy, tokens, labels_pos, labels_neg, ref_pos, ref_neg, lam)
        row = [f"{lam:g}", f"{pos:+.3f}", f"{neg:+.3f}", f"{pos - neg:+.3f}", f"{float(embed[lam].norm()):.4f}",
               f"{float((embed[lam] - embed[lambdas[0]]).norm()):.4f}", f"{cls_norm:.3f}"]
        if fixed_path:
            fixed_model = load_model(fixed_path, "--against", layout=store.attrs)[1].eval()
            fpos, fneg = ratios(fixed_model, tokens, labels_pos, labels_neg, ref_pos, ref_neg, None)
            row += [f"{fpos:+.3f}", f"{fneg:+.3f}"]
        else:
            row += ["", ""]
        out.append(row)
    print(f"{len(rows)} conditional cache rows of {args.cache}; policy {args.policy}")
    print(table(out, ["lambda", "ratio_pos", "ratio_neg", "margin", "|e(lambda)|", "|e(lambda)-e(first)|", "|class emb|",
                      "fixed: ratio_pos", "fixed: ratio_neg"]))


if __name__ == "__main__":
    main()
