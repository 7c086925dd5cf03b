"""`tierstore serve`: the OpenAI-compatible chat server over a store (``tierstore.tools.serve``)."""

from __future__ import annotations

import click

from .options import Opts


@click.command("serve")
@click.option("--model", default="smollm2", show_default=True,
              help="`smollm2` (the bundled SmolLM2-135M-Instruct) or a local transformers checkpoint folder.")
@click.option("--store", "store_path", metavar="DIR", default=None,
              help="Store directory (default: the group's --store, else $TIERSTORE_HOME or the user cache dir).")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, help="0: any free port (printed on stderr).")
@click.option("--hot", default=None, help="Hot-tier budget (e.g. 256MiB; default: the store's).")
@click.option("--warm", default=None, help="Warm-tier budget.")
@click.option("--block-tokens", type=int, default=None, help="Tokens per block of a new store.")
@click.option("--policy", default="exact", show_default=True, help="Placement or sparse policy of the caches.")
@click.option("--budget", "budget_tokens", type=int, default=None, help="Tokens attended per step (sparse policies).")
@click.option("--max-running", default=4, show_default=True,
              help="Requests generating at once (they take turns at the model, token by token).")
@click.option("--max-queue", default=16, show_default=True, help="Requests that may wait beyond those; more get HTTP 429.")
@click.option("--max-tokens", default=1024, show_default=True,
              help="Most new tokens per request (also the default, within the context).")
@click.option("--max-prompt-tokens", type=int, default=None, help="Longest prompt (default: the model's context).")
@click.option("--dtype", default="float32", show_default=True)
@click.option("--name", default=None, help="Model id clients send (default: `smollm2` or the folder's name).")
@click.option("--reuse/--no-reuse", default=True, show_default=True,
              help="Resume stored prefixes (--no-reuse prefills every prompt, for comparisons).")
@click.option("--remote", default=None, metavar="URL",
              help="Shared tier (redis://..., rediss://..., cluster nodes joined by commas; default $TIERSTORE_REMOTE).")
@click.option("--host-id", default=None, help="This host's id in the shared tier (default $TIERSTORE_HOST_ID or the hostname).")
@click.option("--log-level", default="warning", show_default=True, help="uvicorn's log level.")
@click.pass_context
def serve_cmd(ctx: click.Context, model: str, store_path: str | None, host: str, port: int, log_level: str,
              **settings) -> None:
    """Serve POST /v1/chat/completions and /v1/completions (streaming too), GET /v1/models,
    /health and /metrics. Every request resumes the longest stored prefix of its token ids, from
    any earlier request or session, also after a restart; SIGTERM stops gracefully, committing
    what is in flight."""
    try:
        from ..serve.app import listen, serve
        from ..serve.engine import Engine, EngineConfig
    except ImportError as e:
        raise click.ClickException(f"{e.name} is missing: install the serve extra "
                                   '(pip install "tierstore[serve]")') from None
    cfg = EngineConfig(model=model, store=store_path or ctx.find_object(Opts).path, **settings)
    sock = listen(host, port)
    engine = Engine(cfg)
    try:
        engine.start()
    except BaseException:
        engine.close()
        sock.close()
        raise
    bound = sock.getsockname()[1]
    click.echo(f"tierstore serve: listening on http://{host}:{bound} (model {cfg.served_name!r}, store {cfg.store})",
               err=True)
    serve(engine, sock, log_level=log_level)
