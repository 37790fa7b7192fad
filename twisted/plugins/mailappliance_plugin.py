"""twistd plugin: ``twistd mailappliance --config etc/mailappliance.toml``.

Only wiring lives here; the options and the service are in mailappliance.tap.
There is deliberately no ``twisted/plugins/__init__.py`` in this project.
"""

from twisted.application.service import ServiceMaker

mailappliance = ServiceMaker(
    "mailappliance",
    "mailappliance.tap",
    "All-in-one mail server for small ISPs: MX, submission and POP3 over an LDAP directory",
    "mailappliance",
)
