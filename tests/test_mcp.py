"""Gradio's MCP server (FM_DEMO_MCP_SERVER), driven by the official `mcp` client against the real app:
the tools it lists, how they read, and a call to the chat tool."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from gradio_client import Client
from test_openai_api import QUESTION, context, serve

from fm_demo.settings import Settings

pytest.importorskip("mcp")
# Gradio warns about gr.State inputs of every API function, tools or not: the tabs' events have some.
pytestmark = pytest.mark.filterwarnings("ignore:This MCP server includes a tool that has a gr.State input")


@pytest.fixture(scope="module")
def app():
    settings = Settings(device="cpu", max_new_tokens=16, mcp_server=True)
    ctx = context(settings)
    demo, url = serve(settings, ctx)
    yield url, ctx
    demo.close()


def mcp_session(url: str, work):
    """Run `work(session)` in an initialized MCP client session over streamable HTTP."""
    from mcp import ClientSession
    from mcp.client.streamable_http import streamablehttp_client

    async def run():
        async with streamablehttp_client(f"{url}/gradio_api/mcp/") as (read, write, _), \
                ClientSession(read, write) as session:
            await session.initialize()
            return await work(session)

    return asyncio.run(asyncio.wait_for(run(), timeout=120))


def test_the_tools_are_the_documented_api_functions(app):
    url, _ = app

    async def tools(session):
        return (await session.list_tools()).tools

    listed = {t.name: t for t in mcp_session(url, tools)}
    assert set(listed) == {"chat", "compare"}  # not the tabs' UI events
    chat = listed["chat"]
    assert chat.description.startswith("Ask Falcon Mamba") and "Args:" not in chat.description
    props = chat.inputSchema["properties"]
    assert chat.inputSchema["required"] == ["message"]
    assert all(p.get("description") for p in props.values()), props
    assert props["max_new_tokens"]["type"] == "integer" and props["temperature"]["type"] == "number"


def test_the_chat_tool_replies_and_each_call_is_a_new_conversation(app):
    url, ctx = app

    async def two_calls(session):
        return [await session.call_tool("chat", {"message": QUESTION}) for _ in range(2)]

    sessions = ctx.store.stats()["sessions"]
    results = mcp_session(url, two_calls)
    assert ctx.store.stats()["sessions"] == sessions  # the calls' conversations are gone
    replies = [r.content[0].text for r in results]
    assert not any(r.isError for r in results)
    assert replies[0] == replies[1] == Client(url, verbose=False).predict(QUESTION, api_name="/chat")


def test_the_openai_routes_serve_beside_the_mcp_server(app):
    url, _ = app
    assert httpx.get(f"{url}/v1/models").json()["data"][0]["object"] == "model"
