"""Unnamed layers, several in one module, as gocept.httpserverlayer users write them.

zope.testrunner tells layers apart by module and name, also in its ``-j``
subprocesses, which import the test modules again and pick their layer by
that name; so each unnamed layer needs a name of its own that every process
derives alike.
"""

from __future__ import annotations

import gc
import re
import unittest

import plone.testing

from serverlayer import custom, wsgi
from serverlayer.layer import claim_identity, namesakes
from serverlayer.tests.helpers import run_testrunner

SAMPLE = "unnamed_pkg.sample_unnamed"
SAMPLE_LAYERS = ("HTTP_LAYER", "OTHER_HTTP_LAYER", "HANDLER_LAYER", "Layer", "Layer_2")


def app(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b""]


class TestRunnerTests(unittest.TestCase):

    def assert_each_layer_set_up_once(self, output: str) -> None:
        set_up = re.findall(rf"Set up ({re.escape(SAMPLE)}\.\S+) in", output)  # not -j's EmptyLayer
        self.assertEqual(sorted(set_up), sorted(f"{SAMPLE}.{name}" for name in SAMPLE_LAYERS), output)
        self.assertIn("Total: 5 tests, 0 failures, 0 errors", output)

    def test_unnamed_layers_of_one_module_are_set_up_separately(self):
        run = run_testrunner("unnamed", "-vv")
        output = run.stdout + run.stderr
        self.assertEqual(run.returncode, 0, output)
        self.assert_each_layer_set_up_once(output)

    def test_subprocesses_find_each_unnamed_layer(self):
        run = run_testrunner("unnamed", "-vv", "-j", "2")
        output = run.stdout + run.stderr
        self.assertEqual(run.returncode, 0, output)
        self.assertEqual(output.count("Running in a subprocess."), len(SAMPLE_LAYERS), output)
        self.assert_each_layer_set_up_once(output)


class NamingTests(unittest.TestCase):

    def test_a_layer_is_named_after_the_module_variable_it_is_assigned_to(self):
        global MODULE_LAYER
        MODULE_LAYER = wsgi.Layer(app)
        self.addCleanup(globals().pop, "MODULE_LAYER")
        self.assertEqual((MODULE_LAYER.__module__, MODULE_LAYER.__name__), (__name__, "MODULE_LAYER"))

    def test_layers_without_a_variable_are_numbered_in_creation_order(self):
        layers = [custom.Layer(custom.RequestHandler), wsgi.Layer(app), custom.Layer(custom.RequestHandler)]
        self.assertEqual([layer.__name__ for layer in layers], ["Layer", "Layer_2", "Layer_3"])
        self.assertEqual({layer.__module__ for layer in layers}, {__name__})

    def test_a_name_given_twice_is_kept_by_both_layers(self):
        """Only a runner that would mix them up refuses them (test_reporting's
        IdentityTests): a chosen name is never changed."""
        first = wsgi.Layer(app, name="TWICE")
        second = custom.Layer(custom.RequestHandler, name="TWICE")
        self.assertEqual({(layer.__module__, layer.__name__) for layer in (first, second)}, {(__name__, "TWICE")})

    def test_unnamed_layers_are_numbered_past_a_name_two_layers_share(self):
        """A derived name skips an identity, however many layers share it."""
        code = (
            "FIRST = Layer(app, name='Layer')\n"
            "SECOND = Layer(app, name='Layer')\n"
            "UNNAMED = [Layer(app), Layer(app)]\n"
        )
        namespace = {"__name__": "shared_name_sample", "Layer": wsgi.Layer, "app": app}
        exec(compile(code, "<a module with a shared name>", "exec"), namespace)
        layers = [namespace["FIRST"], namespace["SECOND"], *namespace["UNNAMED"]]
        self.assertEqual([layer.__name__ for layer in layers], ["Layer", "Layer", "Layer_2", "Layer_3"])

    def test_a_layer_deep_in_a_long_module_is_named_after_its_variable(self):
        """Where the call is (its bytecode offset) is compared by value: far
        into a module it is a number Python does not cache."""
        code = "\n".join(f"filler_{number} = {number}" for number in range(300)) + "\nDEEP_LAYER = Layer(app)\n"
        namespace = {"__name__": __name__, "Layer": wsgi.Layer, "app": app}
        exec(compile(code, "<a long module>", "exec"), namespace)
        self.assertEqual(namespace["DEEP_LAYER"].__name__, "DEEP_LAYER")

    def test_a_layer_assigned_to_two_names_at_once_is_named_after_neither(self):
        namespace = {"__name__": __name__, "Layer": wsgi.Layer, "app": app}
        exec(compile("CHAINED_A = CHAINED_B = Layer(app)\n", "<a chained assignment>", "exec"), namespace)
        self.assertRegex(namespace["CHAINED_A"].__name__, r"^Layer(_\d+)?$")

    def test_a_layer_made_in_another_objects_init_is_not_named_after_that_objects_variable(self):
        class Holder:
            def __init__(self) -> None:
                self.layer = wsgi.Layer(app)

        global HOLDER
        HOLDER = Holder()
        self.addCleanup(globals().pop, "HOLDER")
        self.assertEqual(HOLDER.layer.__module__, __name__)
        self.assertRegex(HOLDER.layer.__name__, r"^Layer(_\d+)?$")

    def test_a_layer_made_in_a_class_body_is_not_named_after_the_class_attribute(self):
        class Holder:
            LAYER_IN_A_CLASS = wsgi.Layer(app)

        self.assertEqual(Holder.LAYER_IN_A_CLASS.__module__, __name__)
        self.assertRegex(Holder.LAYER_IN_A_CLASS.__name__, r"^Layer(_\d+)?$")

    def test_a_taken_identity_claimed_by_name_is_shared(self):
        """A name the user chose (zopeappwsgi's layers claim theirs so) is
        kept, not changed, when a live layer has it."""
        keep = wsgi.Layer(app, name="CLAIMED")
        other = plone.testing.Layer(name="CLAIMED", module=__name__)
        claim_identity(other)
        self.assertEqual(other.__name__, "CLAIMED")
        self.assertEqual(namesakes(other), [keep])

    def test_a_layer_waiting_for_the_cycle_collector_does_not_keep_its_name(self):
        """A layer of an earlier run of the same code (a repeated doctest)
        that only a reference cycle keeps alive gives its name up: the
        unnamed layer of the next run is named as in a fresh process."""
        gc.disable()
        self.addCleanup(gc.enable)
        code = compile("COLLECTABLE = Layer(app)\n", "<a repeated doctest>", "exec")
        earlier = {"__name__": "repeated_sample", "Layer": wsgi.Layer, "app": app}
        exec(code, earlier)
        earlier["COLLECTABLE"].cycle = earlier["COLLECTABLE"]
        del earlier
        again = {"__name__": "repeated_sample", "Layer": wsgi.Layer, "app": app}
        exec(code, again)
        self.assertEqual(again["COLLECTABLE"].__name__, "COLLECTABLE")
