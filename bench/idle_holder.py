"""Hold N logged-in IMAP sessions in IDLE (run as its own process, so the client's own
memory and file descriptors are not counted with the server's).

    python bench/idle_holder.py PORT USER PASSWORD N

Prints "READY <n> <seconds>" when all N sessions are in IDLE, then waits until stdin is
closed, sends DONE + LOGOUT on none of them (it just closes: the server must cope) and exits.
"""
from __future__ import annotations

import asyncio
import sys
import time


async def one(port: int, user: str, password: str, sem: asyncio.Semaphore, held: list) -> None:
    async with sem:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 16)

        async def until(tag: bytes) -> None:
            while True:
                line = await reader.readline()
                if not line:
                    raise ConnectionError("closed")
                if line.startswith(tag):
                    if tag != b"+" and not line.startswith(tag + b" OK"):
                        raise RuntimeError(line.decode(errors="replace").strip())
                    return

        await reader.readline()  # greeting
        writer.write(f'a LOGIN "{user}" "{password}"\r\nb SELECT INBOX\r\n'.encode())
        await until(b"a")
        await until(b"b")
        writer.write(b"c IDLE\r\n")
        await until(b"+")
        held.append(writer)


async def main() -> None:
    port, user, password, n = int(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
    sem = asyncio.Semaphore(50)
    held: list = []
    t0 = time.perf_counter()
    results = await asyncio.gather(*(one(port, user, password, sem, held) for _ in range(n)),
                                   return_exceptions=True)
    errors = [r for r in results if isinstance(r, BaseException)]
    if errors:
        print(f"ERRORS {len(errors)} first: {errors[0]!r}", flush=True)
    print(f"READY {len(held)} {time.perf_counter() - t0:.2f}", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    for w in held:
        w.close()


if __name__ == "__main__":
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    asyncio.run(main())
