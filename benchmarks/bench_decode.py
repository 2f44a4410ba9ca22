"""What reading a predict request's inputs costs a server: JSON numbers against packed float32.

    .venv/bin/python -m benchmarks.bench_decode [--reps 300]

For 1, 8 and 32 Omniglot images a request, times the server-side path from the request body
(bytes) to the input tensor, as the application runs it: ``json.loads`` (FastAPI's parser),
pydantic validation against ``PredictRequest``, then ``ModelSignature.read``, once with the images
as nested JSON numbers (3-decimal pixels, as ``bench_serve.py`` sends them) and once as
``inputs_b64`` (little-endian float32, base64). Medians over interleaved repetitions, one
thread; the two paths must give the same tensor to float32 rounding of the 3-decimal values.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch

from serve.client import to_packed
from serve.schemas import PredictRequest
from serve.signature import ModelSignature


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--reps", type=int, default=300)
    args = p.parse_args(argv)
    signature = ModelSignature("classification", "omniglot", "maml", 5)
    print("| images a request | body bytes, JSON | body bytes, packed | JSON µs | packed µs "
          "| JSON / packed |")
    print("|---|---|---|---|---|---|")
    for n in (1, 8, 32):
        x = torch.rand(n, 28, 28, generator=torch.Generator().manual_seed(n)).numpy()
        rounded = np.round(x.astype(np.float64), 3)  # short JSON numbers, as clients send
        bodies = {
            "json": json.dumps({"inputs": rounded.tolist()}).encode(),
            "packed": json.dumps({"inputs_b64": to_packed(rounded)}).encode()}

        def read(body: bytes) -> torch.Tensor:
            req = PredictRequest.model_validate(json.loads(body))
            return signature.read(req.inputs, req.inputs_b64, 4096)

        assert torch.allclose(read(bodies["json"]), read(bodies["packed"]), atol=1e-6)
        times: dict[str, list[float]] = {k: [] for k in bodies}
        for _ in range(args.reps):
            for k, body in bodies.items():
                t0 = time.perf_counter()
                read(body)
                times[k].append(time.perf_counter() - t0)
        us = {k: 1e6 * statistics.median(v) for k, v in times.items()}
        print(f"| {n} | {len(bodies['json']):,} | {len(bodies['packed']):,} | "
              f"{us['json']:.0f} | {us['packed']:.0f} | {us['json'] / us['packed']:.0f}× |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
