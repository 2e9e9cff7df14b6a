"""How long a serving forward of a ``MultiLoRALinear`` waits while another thread hot-adds an adapter to it.

One thread calls the layer back to back (4 rows, 64 adapters of rank 16, K = N = 1024, the cpu backend, one
torch thread); the main thread adds 5 adapters meanwhile. Prints the adds' times and the forwards' median and
maximum latency: the maximum is what an add costs the requests in flight.

Usage: ``python bench/lora_add_stall.py``.
"""

from __future__ import annotations

import threading
import time

import torch

from kfuse.nn import MultiLoRALinear


def main() -> None:
    torch.set_num_threads(1)
    K = N = 1024
    m = MultiLoRALinear(K, N, backend="cpu")
    for _ in range(64):
        m.add_adapter(torch.randn(16, K), torch.randn(N, 16), 1.0)
    x, ids = torch.randn(4, K), torch.tensor([0, 1, -1, 3])
    lat: list[float] = []
    stop = threading.Event()

    def serve() -> None:
        with torch.no_grad():
            while not stop.is_set():
                t = time.perf_counter()
                m(x, ids)
                lat.append(time.perf_counter() - t)

    th = threading.Thread(target=serve)
    th.start()
    time.sleep(0.2)
    adds = []
    for _ in range(5):
        t = time.perf_counter()
        m.add_adapter(torch.randn(16, K), torch.randn(N, 16), 1.0)
        adds.append(time.perf_counter() - t)
        time.sleep(0.05)
    stop.set()
    th.join()
    lat.sort()
    print(f"add {min(adds) * 1e3:.1f}-{max(adds) * 1e3:.1f} ms; forward median {lat[len(lat) // 2] * 1e3:.2f} ms, "
          f"max {lat[-1] * 1e3:.1f} ms ({len(lat)} forwards)")


if __name__ == "__main__":
    main()
