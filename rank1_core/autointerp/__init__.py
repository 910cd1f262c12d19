"""LLM autointerpretation: explain, classify, categorize and score every feature.

Modules by role (none imports ray; ``ray_jobs/autointerp.py`` wires them into actors):

- ``clients``  one async interface over the openai and anthropic SDKs
- ``limiter``  token buckets (requests/min, tokens/min per model) on an injectable clock
- ``retry``    exponential backoff with jitter on 429/5xx/timeouts, honouring Retry-After
- ``pricing``  price table and the budget cap; ``gate`` = limits + budget, shared by all callers
- ``cache``    persistent content-addressed cache of requests and answers
- ``worker``   one request -> one logged result (cache, gate, client, retries)
- ``prompts``  the paper's Appendix B prompts, the detection prompt, robust answer parsing
- ``server``   a local OpenAI-compatible vLLM server (the default without API keys)
- ``pipeline`` the stage's work and its tables
"""
