"""Tests of the Zope layers; they need serverlayer[zope,zopeappwsgi].

zope.testrunner's default ``--tests-pattern`` (``^tests$``) never enters
this package, so the main suite runs without Zope installed. Run these with

    python -W error -m zope.testrunner --test-path=src --tests-pattern='^zope_integration$'

(``tox -e zope`` does).
"""
