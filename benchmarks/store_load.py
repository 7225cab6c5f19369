"""The audit store's disk work without a proxy: `database.Database` writing batches at a fixed rate.

    python benchmarks/store_load.py --path FILE [--rate 45000] [--interval 0.2]

`benchmarks/store.py --control` runs this beside a proxy with the store off, so that the
store's SQLite work (the writer's Python, SQLite and the kernel's writes) is measured apart from
the record path inside the proxy: if this process alone costs the proxy as much as the store's
writer thread does, the cost is the machine's cores, not the thread. Records are pre-built once, in
the mix `store.py` produces (10% mirrored with their pairs, 9% sampled with production's
answer, the rest plain), with fresh times per batch; every `--interval` seconds it writes the
records due in chunks of `writer.WRITE_CHUNK`, and prunes once a second, as `writer.StoreWriter`
does. Runs until SIGTERM; prints the records written then.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import orjson  # noqa: E402

from shadowproxy.config import parse_config  # noqa: E402
from shadowproxy.shadow.proxy import new_request_id  # noqa: E402
from shadowproxy.store.database import EXCHANGE, PAIR, Database, connect  # noqa: E402
from shadowproxy.store.writer import WRITE_CHUNK  # noqa: E402

POOL = 65536  # distinct records, reused round the pool
_BODY = orjson.dumps({"predictions": [0.25]})


def _records(n: int) -> list[tuple[Any, ...]]:
    out: list[tuple[Any, ...]] = []
    for i in range(n):
        rid_s = new_request_id().decode()
        latency = 0.0002 + (i % 97) * 1e-5
        if i % 10 == 0:  # mirrored: the exchange and its pair
            out.append((EXCHANGE, rid_s, 0.0, "POST", "/v1/models/m:predict", 200, "v1", latency, True, False,
                        None, None))
            out.append((PAIR, rid_s, 0.0, "agree", 200, "v2", None, latency * 1.3, [0.25], [0.25]))
        elif i % 11 == 0:  # sampled: production's answer kept for its predictions
            out.append((EXCHANGE, rid_s, 0.0, "POST", "/v1/models/m:predict", 200, "v1", latency, False, True,
                        None, _BODY))
        else:
            out.append((EXCHANGE, rid_s, 0.0, "POST", "/v1/models/m:predict", 200, "v1", latency, False, False,
                        None, None))
    return out


def _stamped(item: tuple[Any, ...], when: float) -> tuple[Any, ...]:
    return (*item[:2], when, *item[3:])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="the audit store's SQLite work at a fixed rate, without a proxy")
    p.add_argument("--path", required=True, help="the SQLite file (created)")
    p.add_argument("--rate", type=float, default=50000.0,
                   help="records per second, exchanges and pairs, as shadowproxy_store_written_total counts "
                        "them (default 50000: the store's rate at ~45k requests/s)")
    p.add_argument("--interval", type=float, default=0.2, help="seconds between batches (default 0.2)")
    args = p.parse_args(argv)
    config = parse_config({"production": {"url": "http://127.0.0.1:1"}, "candidate": {"url": "http://127.0.0.1:2"},
                           "store": {"path": args.path, "sample_rate": 0.1}})
    db = Database(connect(args.path), config.store, config.compare)
    pool = _records(POOL)
    stop = False

    def on_term(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    at = written = 0
    owed = 0.0
    next_prune = last = time.monotonic()
    while not stop:
        time.sleep(args.interval)
        now = time.monotonic()
        owed += (now - last) * args.rate
        last = now
        due = int(owed)
        owed -= due
        when = time.time()
        batch = []
        for _ in range(due):
            batch.append(_stamped(pool[at], when))
            at = (at + 1) % len(pool)
        for start in range(0, len(batch), WRITE_CHUNK):
            db.write(batch[start:start + WRITE_CHUNK])
        written += len(batch)
        if now >= next_prune:
            next_prune = now + 1.0
            db.prune(time.time())
    db.close()
    print(f"store_load: {written} records written to {args.path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
