"""`llava-gguf serve`: the options, parsed; the server is llava_gguf.serve."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from llava_gguf.serve.run import API_KEY_ENV, ServeOptions, serve as run_server


def serve(
    path: Path = typer.Argument(..., help="directory that convert/quantize wrote, or an LLM .gguf"),
    mmproj: Optional[Path] = typer.Option(None, "--mmproj", help="the mmproj .gguf"),
    host: str = typer.Option("127.0.0.1", "--host", help="address to listen on (default: this machine only)"),
    port: int = typer.Option(8080, "--port", help="port (0: any free one; the URL is printed)"),
    parallel: int = typer.Option(2, "--parallel", "-np", help="conversations decoded at once (sequences)"),
    n_ctx: Optional[int] = typer.Option(None, "--ctx", "--n-ctx", min=64, help="positions per conversation"),
    threads: Optional[int] = typer.Option(None, "--threads", min=1),
    system: Optional[str] = typer.Option(None, "--system", help="system prompt for requests that give none"),
    queue: int = typer.Option(16, "--queue", help="requests that may wait for a free sequence (then 503)"),
    api_key: Optional[str] = typer.Option(None, "--api-key", help=f"require this key (or ${API_KEY_ENV})"),
    model_alias: Optional[str] = typer.Option(None, "--model-alias", help="the model's name in the API"),
    media_root: Optional[Path] = typer.Option(None, "--media-root", help="allow file:// images under this directory"),
    allow_remote_images: bool = typer.Option(False, "--allow-remote-images",
                                             help="fetch http(s) image URLs (public addresses only)"),
    max_image_bytes: int = typer.Option(20 << 20, "--max-image-bytes", help="largest image accepted"),
    cors_origin: Optional[list[str]] = typer.Option(None, "--cors-origin", help="allow this browser origin (repeatable)"),
    grace: float = typer.Option(5.0, "--grace", help="seconds running answers get to finish after SIGTERM"),
    verbose: bool = typer.Option(False, "--verbose", help="llama.cpp's logs and the access log"),
) -> None:
    """An OpenAI-compatible server (/v1/chat/completions, /v1/models, /health, /metrics) and a web page at /."""
    code = run_server(ServeOptions(path=path, mmproj=mmproj, host=host, port=port, parallel=parallel, ctx=n_ctx,
                                   threads=threads, system=system, queue=queue, api_key=api_key,
                                   model_alias=model_alias, media_root=media_root,
                                   allow_remote_images=allow_remote_images, max_image_bytes=max_image_bytes,
                                   cors_origins=tuple(cors_origin or ()), grace=grace, verbose=verbose))
    if code:
        raise typer.Exit(code)
