"""Serving a sharing strategy on vLLM.

`export_vllm` (kvshare.serving.export) writes a model directory whose config names a kvshare architecture and
carries the strategy; the vLLM plugin (kvshare.serving.vllm_plugin, registered through the `vllm.general_plugins`
entry point) builds that architecture with vLLM's own cross-layer KV sharing. The mapping and its validation
(kvshare.serving.mapping) are plain Python, shared by both sides.

This package imports nothing heavy: vLLM imports the plugin module in every process it starts.
"""
