"""Tests of the message board; zope.testrunner finds them here."""
