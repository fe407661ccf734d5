"""The live router: an aiohttp OpenAI front door over the pure policies in ``router.policies``."""
