"""A tiny notes application, tested over real HTTP with serverlayer.

``app`` is the application (standard library only), ``testing`` defines
the test layers, ``tests`` holds the tests that use them.
"""
