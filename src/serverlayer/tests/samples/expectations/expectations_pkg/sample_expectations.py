"""Tests whose expectations fail, or hold; run by test_content."""

import unittest
import urllib.error
import urllib.request

from serverlayer import content

PAYMENTS = content.Layer(name="PAYMENTS")


def post(url, data=b"{}"):
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data), timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


class PaymentTests(unittest.TestCase):
    layer = PAYMENTS

    def test_1_expected_charge_never_made(self):
        self.layer["http_content"].expect("/charges", "POST", query={"amount": "100"})
        post(self.layer["http_url"] + "charges?amount=99")

    def test_2_expectations_do_not_leak(self):
        self.assertEqual(post(self.layer["http_url"] + "anything"), 404)

    def test_3_expectation_met(self):
        self.layer["http_content"].expect("/charges", "POST").respond_json({"id": "ch_1"}, status=201)
        self.assertEqual(post(self.layer["http_url"] + "charges"), 201)
