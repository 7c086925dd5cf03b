"""`tierstore chat`: an interactive multi-turn chat whose KV lives in a session of the store."""

from __future__ import annotations

import sys

import click

from .options import Opts


@click.command("chat")
@click.option("--session", required=True, help="Session name; resumed when it exists.")
@click.option("--model", "model_path", default=None,
              help="A local transformers model folder (default: the bundled SmolLM2-135M-Instruct).")
@click.option("--hot", default="256MiB", show_default=True, help="Hot-tier budget.")
@click.option("--warm", default="1GiB", show_default=True, help="Warm-tier budget.")
@click.option("--max-new-tokens", default=256, show_default=True)
@click.option("--system", default=None, help="System prompt of a new conversation.")
@click.pass_context
def chat_cmd(ctx: click.Context, session: str, model_path: str | None, hot: str, warm: str,
             max_new_tokens: int, system: str | None) -> None:
    """Chat on the command line; every turn is committed, so `chat --session NAME` resumes it.
    One message per line; an empty line or end of input ends the chat."""
    import torch

    import tierstore
    from tierstore.adapters.conversation import Conversation
    from tierstore.layout import check_session_name

    check_session_name(session)
    if model_path is None:
        from tierstore.adapters.models import load_smollm2
        model, tok = load_smollm2(torch.float32)
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer
        model = AutoModelForCausalLM.from_pretrained(model_path).eval()
        tok = AutoTokenizer.from_pretrained(model_path)
    path = ctx.find_object(Opts).path
    with tierstore.open(path, hot=hot, warm=warm) as store:
        if store.exists(session):
            conv = Conversation.resume(store, model, tok, session)
            click.echo(f"(resumed {session!r}: {conv.cache.get_seq_length()} tokens, "
                       f"{sum(m['role'] == 'user' for m in conv.messages)} earlier turns)", err=True)
        else:
            conv = Conversation(store, model, tok, session, system=system)
        with conv:
            interactive = sys.stdin.isatty()
            while True:
                if interactive:
                    click.echo("you> ", nl=False, err=True)
                line = sys.stdin.readline()
                if not line.strip():
                    break
                if interactive:
                    click.echo("bot> ", nl=False, err=True)
                conv.say(line.strip(), max_new_tokens=max_new_tokens,
                         on_text=lambda piece: click.echo(piece, nl=False))
                click.echo()
