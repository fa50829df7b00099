"""Tests of the notes application; zope.testrunner finds them here."""
