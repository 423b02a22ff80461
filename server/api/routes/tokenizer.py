"""vLLM's tokenizer endpoints: POST /tokenize, POST /detokenize, GET /tokenizer_info. Clients that
count tokens or tokenize remotely (lm-eval's remote tokenizer among them) use them; the ids are the
ones the completions and chat endpoints feed the model."""
from __future__ import annotations

from fastapi import APIRouter

from server.api.body import CheckedRoute
from server.api.context import Context
from server.api.errors import bad_request
from server.api.protocol import DetokenizeRequest, DetokenizeResponse, TokenizeRequest, TokenizeResponse

router = APIRouter(route_class=CheckedRoute)


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, ctx: Context) -> TokenizeResponse:
    ctx.check_model(body.model)
    if body.messages is not None:
        ids = (await ctx.client.render_chat(body.messages)).token_ids
    else:
        ids = await ctx.client.tokenize(body.prompt, body.add_special_tokens)
    strs = ctx.client.tokenizer.convert_ids_to_tokens(ids) if body.return_token_strs else None
    return TokenizeResponse(count=len(ids), max_model_len=ctx.client.max_model_len, tokens=ids, token_strs=strs)


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, ctx: Context) -> DetokenizeResponse:
    ctx.check_model(body.model)
    vocab = len(ctx.client.tokenizer)
    if any(not 0 <= t < vocab for t in body.tokens):
        raise bad_request(f"tokens: ids must be in [0, {vocab})", "tokens")
    return DetokenizeResponse(prompt=ctx.client.tokenizer.decode(body.tokens))


@router.get("/tokenizer_info")
async def tokenizer_info(ctx: Context) -> dict:
    """The tokenizer's identity and special tokens, enough for a client to tokenize as we do."""
    tokenizer = ctx.client.tokenizer
    special = {name: getattr(tokenizer, name, None) for name in ("bos_token", "eos_token", "pad_token", "unk_token")}
    return {
        "tokenizer_class": type(tokenizer).__name__,
        "name_or_path": ctx.model_name,
        "vocab_size": len(tokenizer),
        "model_max_length": ctx.client.max_model_len,
        "add_bos_token": bool(tokenizer.encode("a", add_special_tokens=True)[:1] == [tokenizer.bos_token_id]),
        "chat_template": getattr(tokenizer, "chat_template", None),
        **{k: v if isinstance(v, str) or v is None else str(v) for k, v in special.items()},
        **{f"{k}_id": getattr(tokenizer, f"{k}_id", None) for k in special},
    }
