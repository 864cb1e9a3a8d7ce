"""`llava-gguf serve`: check the options, bind the socket (a port in use is a one-line error), answer /health
("loading") at once while the engine loads in a thread, then serve until SIGINT/SIGTERM. The line
`listening on http://HOST:PORT` on stdout says the model is loaded and requests are served."""
from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from llava_gguf.errors import InvalidSetting, LlavaGgufError, warn
from llava_gguf.gguf.pairing import locate_pair
from llava_gguf.runtime.engine import Engine
from llava_gguf.runtime.sampling import is_int
from llava_gguf.serve.app import ServerState, build_app
from llava_gguf.serve.guard import is_loopback
from llava_gguf.serve.protocol import ImagePolicy
from llava_gguf.runtime.scheduler import Scheduler

API_KEY_ENV = "LLAVA_GGUF_API_KEY"


@dataclass(frozen=True)
class ServeOptions:
    path: Path
    mmproj: Path | None = None
    host: str = "127.0.0.1"
    port: int = 8080
    parallel: int = 2
    ctx: int | None = None  # positions per conversation (the context holds parallel x ctx)
    threads: int | None = None
    system: str | None = None
    queue: int = 16
    api_key: str | None = None
    model_alias: str | None = None
    media_root: Path | None = None
    allow_remote_images: bool = False
    max_image_bytes: int = 20 << 20
    max_images: int = 8
    grace: float = 5.0  # seconds the answers still running get after SIGTERM/SIGINT
    cors_origins: tuple[str, ...] = ()
    verbose: bool = False


def check(o: ServeOptions) -> tuple[Path, Path, ImagePolicy, str | None]:
    """The files, the image policy and the API key, or a one-line error."""
    if not is_int(o.port) or not 0 <= o.port <= 65535:
        raise InvalidSetting(f"--port must be from 0 to 65535, not {o.port!r}")
    if not is_int(o.parallel) or not 1 <= o.parallel <= 64:
        raise InvalidSetting(f"--parallel must be from 1 to 64, not {o.parallel!r}")
    if not isinstance(o.grace, (int, float)) or not 0 <= o.grace <= 3600:
        raise InvalidSetting(f"--grace must be from 0 to 3600 seconds, not {o.grace!r}")
    if not is_int(o.queue) or o.queue < 0:
        raise InvalidSetting(f"--queue must be 0 or more, not {o.queue!r}")
    if not is_int(o.max_image_bytes) or o.max_image_bytes < 1024:
        raise InvalidSetting(f"--max-image-bytes must be at least 1024, not {o.max_image_bytes!r}")
    key = o.api_key if o.api_key is not None else os.environ.get(API_KEY_ENV) or None
    if key is not None and (not key.strip() or len(key) < 8 or not key.isprintable()):
        raise InvalidSetting("the API key must be at least 8 printable characters")
    root = None
    if o.media_root is not None:
        root = Path(o.media_root).expanduser().resolve()
        if not root.is_dir():
            raise LlavaGgufError(f"--media-root {o.media_root} is not a directory")
    if key is None and not is_loopback(o.host):
        warn(f"serving on {o.host} without an API key: anyone who can reach it can use the model",
             f"set --api-key or ${API_KEY_ENV}")
    # serve has no --model: the LLM is chosen by giving its file as PATH
    llm, mmproj = locate_pair(o.path, None, o.mmproj, choices=("PATH (give the language model's .gguf itself)", "--mmproj"))
    policy = ImagePolicy(media_root=root, allow_remote=o.allow_remote_images, max_bytes=o.max_image_bytes,
                         max_images=o.max_images)
    return llm, mmproj, policy, key


def body_limit(max_image_bytes: int) -> int:
    """The largest request body: room for two images of the largest size in base64 and the text (32 MiB at
    least). Bodies are held in memory while they are parsed; more images must be smaller."""
    return max(32 << 20, 2 * max_image_bytes * 4 // 3 + (1 << 20))


def bind(host: str, port: int) -> socket.socket:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise LlavaGgufError(f"cannot listen on {host}: {e.strerror}") from None
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
        sock.listen(128)
    except OSError as e:
        sock.close()
        raise LlavaGgufError(f"cannot listen on {host}:{port}: {e.strerror or e}",
                             "is another server using the port? choose another with --port") from None
    sock.set_inheritable(True)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://{'[' + host + ']' if ':' in host else host}:{port}"


def serve(o: ServeOptions) -> int:
    """Serve until stopped; the exit status (1 when the model fails to load)."""
    # uvicorn only when serving: every other command starts without it
    import uvicorn

    llm, mmproj, policy, key = check(o)
    # a request image's header over Pillow's warning limit is refused with a 413 (protocol.py): not also a
    # Python warning on stderr
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
    sock = bind(o.host, o.port)
    url = url_of(sock)
    alias = o.model_alias or llm.stem
    state = ServerState(alias=alias, names={alias, llm.name, llm.stem}, policy=policy, api_key=key,
                        system=o.system, parallel=o.parallel, max_body=body_limit(o.max_image_bytes),
                        loopback_only=is_loopback(o.host))
    app = build_app(state, cors_origins=list(o.cors_origins))
    config = uvicorn.Config(app, log_level="info" if o.verbose else "warning", access_log=o.verbose,
                            timeout_graceful_shutdown=o.grace + 2, lifespan="off")

    class Server(uvicorn.Server):
        """SIGTERM/SIGINT stop serving (a second SIGINT: at once) and end the process normally: uvicorn's own
        handler raises the signal again once it has shut down, which kills the process (exit 143) before the
        engine is closed. Answers still running get --grace seconds to finish, then end with an error event
        and [DONE] instead of a cut connection."""

        def handle_exit(self, sig: int, frame) -> None:
            if self.should_exit and sig == signal.SIGINT:
                self.force_exit = True
            self.should_exit = True
            if state.scheduler is not None and ending.ident is None:  # started once
                ending.start()

    server = Server(config)
    ending = threading.Timer(o.grace, lambda: state.scheduler and state.scheduler.shutdown())
    ending.daemon = True

    def load() -> None:
        try:
            engine = Engine.open(llm, mmproj, n_seq_max=o.parallel, n_ctx=o.ctx, n_threads=o.threads, verbose=o.verbose)
        except Exception as e:  # noqa: BLE001 - said in one line: the process ends with exit 1
            state.error = e.one_line() if isinstance(e, LlavaGgufError) else f"{type(e).__name__}: {str(e)[:300]}"
            print(f"error: {state.error}", file=sys.stderr, flush=True)
            server.should_exit = True
            return
        state.n_ctx = engine.n_ctx
        state.scheduler = Scheduler(engine, queue=o.queue)
        print(f"llava-gguf serve: {llm.name} + {mmproj.name}, {o.parallel} sequences of {engine.n_ctx} positions; "
              f"listening on {url}", flush=True)

    print(f"llava-gguf serve: loading {llm.name} (GET {url}/health says when it is ready)", file=sys.stderr, flush=True)
    loader = threading.Thread(target=load, name="llava-gguf-load", daemon=True)
    loader.start()
    try:
        server.run(sockets=[sock])
    finally:
        ending.cancel()
        loader.join()
        # the engine is closed only once its scheduler thread has stopped (never under it in native code)
        if state.scheduler is not None and state.scheduler.stop():
            state.scheduler.engine.close()
        sock.close()
    return 1 if state.error else 0
