from setuptools import find_packages, setup

with open("README.rst", encoding="utf-8") as readme, open("CHANGES.rst", encoding="utf-8") as changes:
    long_description = readme.read() + "\n\n" + changes.read()

setup(
    name="serverlayer",
    version="0.1.0.dev0",
    description="Real HTTP and SMTP servers as zope.testrunner test layers",
    long_description=long_description,
    long_description_content_type="text/x-rst",
    license="ZPL-2.1",
    project_urls={
        "Documentation": "https://serverlayer.readthedocs.io/",
        "Changelog": "https://serverlayer.readthedocs.io/en/latest/changes.html",
    },
    python_requires=">=3.10",
    package_dir={"": "src"},
    packages=find_packages("src", exclude=["serverlayer.tests.samples*"]),
    package_data={"serverlayer": ["py.typed"]},
    include_package_data=True,
    zip_safe=False,
    install_requires=[
        "plone.testing",
        "zope.testrunner",
        "waitress >= 3.0",
        "aiosmtpd >= 1.4.6",
        "trustme >= 1.2",
    ],
    extras_require={
        # README.rst and CHANGES.rst must render on PyPI: the suite checks them.
        # requests, httpx and aiohttp: the tests try the layers with the clients users have;
        # gocept.httpserverlayer: they use its classes as its users pass them to ours.
        # starlette: the example application in examples/board (lifespan state: >= 0.26).
        "test": [
            "docutils >= 0.22", "pygments", "pytest", "pytest-xdist", "zope.pytestlayer",
            "requests", "httpx", "aiohttp", "aiosmtplib", "gocept.httpserverlayer == 4.0",
            "uvicorn >= 0.52.1", "httptools >= 0.6", "websockets >= 13.0", "starlette >= 0.26",
        ],
        # serverlayer.asgi: ASGI 3 applications (HTTP and WebSocket) served by uvicorn, with its
        # websockets-sansio protocol as it is since 0.52.1 (closing handshake, write flow control);
        # httptools: uvicorn's C parser, which it serves with by default where it is installed.
        "asgi": ["uvicorn >= 0.52.1", "httptools >= 0.6", "websockets >= 13.0"],
        # http_content.websocket(): websockets' sans-I/O protocol speaks the frames.
        "websocket": ["websockets >= 13.0"],
        # The peers benchmarks/ measures serverlayer against; users never need them. uvicorn and
        # websockets: bench_peers.py serves with serverlayer.asgi and uvicorn's own server, and
        # its WebSocket client is websockets' sync client.
        "bench": [
            "gocept.httpserverlayer == 4.0",
            "pytest-localserver >= 0.10",
            "pytest-httpserver >= 1.2",
            "WebTest >= 3.0",
            "uvicorn >= 0.52.1",
            "httptools >= 0.6",
            "websockets >= 13.0",
        ],
        # serverlayer.plonetestingzope: Zope 5 or 6, through plone.testing's Zope layers.
        # Products.ZCatalog: plone.testing's STARTUP installs Products.PluginIndexes, which Zope 6
        # moved there; without it, every set-up prints that it could not install the product.
        "zope": ["Zope >= 5", "plone.testing[zope]", "Products.ZCatalog"],
        # serverlayer.zopeappwsgi: zope.app.wsgi (Zope Toolkit, Grok) over a ZODBLayer's database.
        "zopeappwsgi": ["zope.app.wsgi >= 4", "zope.app.appsetup >= 4", "ZODB"],
        # Building the documentation in docs/ (`tox -e docs`, Read the Docs):
        # Sphinx with autodoc, and the furo theme. autodoc imports every module
        # the API reference shows, serverlayer.asgi too: uvicorn and websockets.
        "docs": ["sphinx >= 7.2", "furo >= 2024.1.29", "uvicorn >= 0.52.1", "websockets >= 13.0"],
        # The real-browser tests (zope.testrunner level 2, tests/test_browser.py);
        # they also need Chromium, chromedriver and certutil from the system.
        "browser": ["selenium >= 4.11", "gocept.selenium >= 7.1"],
    },
    classifiers=[
        "Framework :: Zope",
        "Framework :: Plone",
        "Framework :: Pytest",
        "Intended Audience :: Developers",
        "Programming Language :: Python :: 3",
        "Programming Language :: Python :: 3.10",
        "Programming Language :: Python :: 3.11",
        "Programming Language :: Python :: 3.12",
        "Programming Language :: Python :: 3.13",
        "Topic :: Software Development :: Testing",
    ],
)
