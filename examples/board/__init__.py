"""A message board with a live feed: a Starlette application tested over
real HTTP and WebSocket with ``serverlayer.asgi``.

``app`` is the application, ``testing`` defines the test layers, ``tests``
holds the tests that use them.
"""
