"""A plain test function leaving a request running: run by test_integrations,
not collected by the suite."""

import socket
import threading

from zope.pytestlayer import fixture

from serverlayer import custom

started, go = threading.Event(), threading.Event()
serving: list[threading.Thread] = []


class Stuck(custom.RequestHandler):
    def do_GET(self):
        serving.append(threading.current_thread())
        started.set()
        go.wait(60)
        raise RuntimeError("raised after its test ended")


LAYER = custom.Layer(Stuck, name="LAYER", quiet_timeout=0.05, stop_timeout=0.05)
globals().update(fixture.create(LAYER, function_fixture_name="http_layer"))
clients: list[socket.socket] = []


def test_a_leaves_a_request_running(http_layer):
    client = socket.create_connection((http_layer["http_host"], http_layer["http_port"]), timeout=60)
    clients.append(client)
    client.sendall(b"GET /stuck HTTP/1.1\r\nHost: x\r\n\r\n")
    assert started.wait(60)


def test_b_during_which_it_raises(http_layer):
    go.set()
    for thread in serving:
        thread.join(60)
    for client in clients:
        client.close()
