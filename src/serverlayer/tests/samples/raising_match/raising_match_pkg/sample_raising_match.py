"""A test whose match= function raises on the request that came, so that
its expectation is unmet; run by test_content."""

import unittest
import urllib.error
import urllib.request

from serverlayer import content

ORDERS = content.Layer(name="ORDERS")


def order_seven(request):
    return request.json()["id"] == 7


class OrderTests(unittest.TestCase):
    layer = ORDERS

    def test_form_sent_where_json_was_expected(self):
        self.layer["http_content"].expect("/orders", "POST", match=order_seven).respond("ok")
        request = urllib.request.Request(self.layer["http_url"] + "orders", data=b"id=7")
        with self.assertRaises(urllib.error.HTTPError):
            urllib.request.urlopen(request, timeout=5)
