"""`mixtral-jax plan`: per-device memory of a config on a mesh, from XLA's analysis of the compiled programs."""

from __future__ import annotations

import argparse
import json

from mixtral_jax.cli import _args
from mixtral_jax.config import KV_CACHE_DTYPES, QUANTIZE
from mixtral_jax.plan import CHIPS, GIB

HELP = "per-device memory of prefill and decode on a mesh (compiled ahead of time, nothing allocated)"


def register(subparsers) -> None:
    p = subparsers.add_parser("plan", help=HELP, description=HELP)
    p.add_argument("--config", required=True, help="preset name (e.g. mixtral-8x7b) or a config .json")
    p.add_argument("--mesh", required=True, help="mesh spec axis=size,... over data, fsdp, expert, tensor")
    p.add_argument("--batch", type=_args.positive_int, default=1, help="sequences decoded together (default 1)")
    p.add_argument("--max-len", type=_args.positive_int, default=4096, help="prompt plus new tokens (default 4096)")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32", "float16"),
                   help="weights, activations and KV cache dtype (default bfloat16)")
    p.add_argument("--quantize", default="none", choices=QUANTIZE,
                   help="attention and expert weights in int8 or int4 (docs/quantization.md; default none)")
    p.add_argument("--quant-group", type=_args.positive_int, default=128, metavar="N",
                   help="int4: entries per scale along the contracted dimension (default 128)")
    p.add_argument("--quantize-vocab", action="store_true",
                   help="with --quantize: the embedding table and LM head too (docs/quantization.md)")
    p.add_argument("--kv-cache-dtype", default="auto", choices=KV_CACHE_DTYPES,
                   help="int8: the KV cache in int8 with a scale per token and KV head (default auto: --dtype)")
    fit = p.add_mutually_exclusive_group()
    fit.add_argument("--hbm-gb", type=_args.positive_float, help="memory per device in GiB to check the plan against")
    fit.add_argument("--chip", help=f"a known chip to check against: {', '.join(CHIPS)}")
    p.add_argument("--json", action="store_true", help="print one JSON line")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from mixtral_jax import plan

    hbm = plan.hbm_of(args.chip) if args.chip else args.hbm_gb
    result = plan.plan(args.config, args.mesh, args.batch, args.max_len, args.dtype, args.quantize,
                       args.kv_cache_dtype, args.quant_group, args.quantize_vocab)
    if args.json:
        print(json.dumps(result.to_json(hbm)))
        return 0
    mesh = ",".join(f"{k}={v}" for k, v in result.mesh.items() if v > 1) or "one device"
    formats = args.dtype + ("" if args.quantize == "none" else f", {args.quantize} weights") + (
        " (vocabulary too)" if args.quantize_vocab else "") + (
        ", int8 KV cache" if args.kv_cache_dtype == "int8" else "")
    print(f"{args.config} ({result.param_count / 1e9:.1f}B parameters, {formats}) on {mesh} "
          f"({result.devices} devices), batch {args.batch}, {args.max_len} tokens; per device:")
    rows = [("parameters", result.params_bytes), ("KV cache", result.cache_bytes),
            ("temporaries", result.temp_bytes), ("prefill peak", result.prefill_bytes),
            ("decode peak", result.decode_bytes), ("total", result.total_bytes)]
    for name, value in rows:
        print(f"  {name:<13} {value / GIB:8.2f} GiB")
    if hbm is not None:
        spare = hbm - result.total_bytes / GIB
        verdict = f"fits, {spare:.2f} GiB to spare" if spare >= 0 else f"does NOT fit, {-spare:.2f} GiB short"
        print(f"  {args.chip or 'device'} with {hbm:g} GiB: {verdict}")
    return 0
