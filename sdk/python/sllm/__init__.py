"""Python client for sllm, a serverless LLM serving control plane.

`Client` (blocking) and `AsyncClient` (asyncio) wrap the generated gRPC stubs in `sllm.v1`.
"""

from sllm.client import (
    AsyncClient,
    Chunk,
    Client,
    Finished,
    Progress,
    SllmError,
)

__all__ = ["AsyncClient", "Chunk", "Client", "Finished", "Progress", "SllmError"]
