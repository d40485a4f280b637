"""The network settings of the config: the HTTP address, token and TLS files, the [cluster] keys.

Owns the parsing and validation of ``http``, ``http_token``, ``http_cert`` and of
the [cluster] section (etcd URLs, name, node, ttl, quorum, TLS files), and the
TLS contexts made from them (ssl is imported only where one is made).

Uses: base, config.
"""

import ipaddress
import os
import re
import socket
import stat

from .base import ETCD_PORT, parse_duration, valid_name
from .config import ClusterSettings, HttpAddress


_HTTP_ADDRESS_RE = re.compile(r"(?:\[([^\]]*)\]|([^\[\]:]*)):(\d{1,5})\Z")
_HTTP_FORMS = "write IP:PORT, :PORT, [::1]:PORT, 0.0.0.0:PORT or localhost:PORT"


def parse_http_address(text):
    """``IP:PORT``, ``:PORT`` (127.0.0.1), ``[IPv6]:PORT``, ``localhost:PORT`` -> HttpAddress.

    Only addresses, and ``localhost``: a name to resolve would make the listener
    depend on the resolver at every start and reload.
    """
    m = _HTTP_ADDRESS_RE.match(text)
    if not m:
        raise ValueError("http = %s is not an address with a port; %s" % (text, _HTTP_FORMS))
    port = int(m.group(3))
    if not 0 < port < 65536:
        raise ValueError("http = %s: port %d is not between 1 and 65535" % (text, port))
    bracketed = m.group(1) is not None
    host = m.group(1) if bracketed else (m.group(2) or "127.0.0.1")
    if host == "localhost" and not bracketed:
        host = "127.0.0.1"
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError("http = %s: %r is not an IP address; %s" % (text, host, _HTTP_FORMS)) from None
    if bracketed != (ip.version == 6):
        raise ValueError("http = %s: %s" % (text, "brackets are for IPv6 addresses only" if bracketed
                                             else "an IPv6 address goes in brackets: [%s]:%d" % (ip, port)))
    return HttpAddress(str(ip), port, text)


def _private_file(path):
    """(bytes, None) of a regular file that only its owner may read, or (None, the problem)."""
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            return None, "%s is not a file" % path
        if st.st_mode & 0o044:
            return None, ("%s is readable by group or others (mode %04o): chmod 600 %s"
                          % (path, stat.S_IMODE(st.st_mode), path))
        with open(path, "rb") as f:
            return f.read(), None
    except FileNotFoundError:
        return None, "%s does not exist" % path
    except OSError as exc:
        return None, "cannot read %s: %s" % (path, exc.strerror)


def read_http_token(path):
    """The access token in ``path`` (its content without surrounding whitespace): (token, problem)."""
    data, problem = _private_file(path)
    if problem:
        return None, problem
    token = data.strip()
    if not token:
        return None, "%s is empty" % path
    if not re.match(rb"[\x21-\x7e]+\Z", token):
        return None, ("%s: the token must be one word of printable ASCII (it travels in an "
                      "Authorization header)" % path)
    return token.decode("ascii"), None


def _no_password():
    return b""          # an encrypted key fails to load instead of prompting on a terminal


def http_ssl_context(path):
    """The server's TLS context from one PEM holding certificate and key; ValueError says what is wrong."""
    data, problem = _private_file(path)
    if problem:
        raise ValueError(problem)
    text = data.decode("ascii", "replace")
    if "-----BEGIN CERTIFICATE-----" not in text:
        raise ValueError("%s holds no certificate (-----BEGIN CERTIFICATE-----)" % path)
    if "ENCRYPTED PRIVATE KEY" in text or "Proc-Type: 4,ENCRYPTED" in text:
        raise ValueError("%s: the private key is encrypted; the daemon needs it without a "
                         "passphrase (openssl pkey -in KEY -out KEY.plain)" % path)
    if not re.search(r"-----BEGIN (?:[A-Z]+ )?PRIVATE KEY-----", text):
        raise ValueError("%s holds no private key: put the key and the certificate in one PEM file"
                         % path)
    import ssl                          # only for https: 3 MB of modules a daemon without does without
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(path, password=_no_password)
    except ssl.SSLError as exc:
        raise ValueError("%s: not a certificate and key ssl can use (%s)"
                         % (path, exc.reason or exc)) from None
    return context


def _http_settings(daemon, config_dir, errors):
    """Check the [daemon] http settings together; the token's setting becomes the token itself."""
    if "http_token" in daemon:
        where, name = daemon["http_token"]
        token, problem = read_http_token(os.path.join(config_dir, name))
        if problem:
            errors.append("%s: http_token = %s: %s" % (where, name, problem))
            token = ""          # set, but bad: no second error for the address below
        daemon["http_token"] = (where, token)
    if "http_cert" in daemon:
        where, name = daemon["http_cert"]
        path = os.path.abspath(os.path.join(config_dir, name))
        try:
            http_ssl_context(path)
        except ValueError as exc:
            errors.append("%s: http_cert = %s: %s" % (where, name, exc))
        daemon["http_cert"] = (where, path)
    if "http" in daemon:
        where, address = daemon["http"]
        if not address.loopback and "http_token" not in daemon:
            errors.append("%s: http = %s is not a loopback address: set http_token too (a file "
                          "holding the access token), or anyone who reaches it reads the status"
                          % (where, address.text))


_ETCD_URL_RE = re.compile(r"(https?)://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9][A-Za-z0-9_.-]*)(?::(\d{1,5}))?/?\Z")


def parse_etcd_url(url):
    """``http(s)://HOST[:PORT]`` -> (scheme, host, port); ValueError names what is wrong."""
    m = _ETCD_URL_RE.match(url)
    if not m:
        raise ValueError("bad etcd endpoint %r: write http://HOST:PORT or https://HOST:PORT" % url)
    port = int(m.group(3) or ETCD_PORT)
    if not 0 < port < 65536:
        raise ValueError("bad port in etcd endpoint %r" % url)
    return m.group(1), m.group(2).strip("[]"), port


def _cluster_value(key, words, where, config_dir, errors):
    """Convert one [cluster] setting; append an error and return None when bad."""
    try:
        if key == "etcd":
            urls = [u for u in " ".join(words).replace(",", " ").split() if u]
            if not urls:
                raise ValueError("etcd needs at least one endpoint URL")
            for url in urls:
                parse_etcd_url(url)
            if len(set(urls)) != len(urls):
                raise ValueError("an etcd endpoint is listed twice: %s" % " ".join(urls))
            return tuple(u.rstrip("/") for u in urls)
        if len(words) != 1:
            raise ValueError("%s takes one value, got %d: %r" % (key, len(words), " ".join(words)))
        value = words[0]
        if key in ("name", "node"):
            if not valid_name(value):
                raise ValueError("bad %s %r (letters, digits, _ . : - )" % (key, value))
            return value
        if key == "ttl":
            try:
                seconds = parse_duration(value)
            except ValueError as exc:
                raise ValueError("ttl: %s" % exc)
            if seconds != int(seconds) or not 1 <= seconds <= 60:
                raise ValueError("ttl must be whole seconds from 1s to 60s (etcd leases "
                                 "count in seconds), got %r" % value)
            return int(seconds)
        if key == "quorum":
            if not value.isdigit() or int(value) < 1:
                raise ValueError("quorum must be a whole number of at least 1, got %r" % value)
            return int(value)
        path = os.path.join(config_dir, value)      # etcd_ca, etcd_cert, etcd_key
        try:
            with open(path, "rb"):
                pass
        except OSError as exc:
            raise ValueError("%s = %s: cannot read %s: %s" % (key, value, path, exc.strerror))
        return path
    except ValueError as exc:
        errors.append("%s: %s" % (where, exc))
        return None


def etcd_ssl_context(cluster):
    """TLS for https endpoints: the CA (default: the system's) and the client certificate."""
    import ssl                          # ssl and http.client only with [cluster]: 3 MB and more
    context = ssl.create_default_context(cafile=cluster.etcd_ca)
    if cluster.etcd_cert:
        context.load_cert_chain(cluster.etcd_cert, cluster.etcd_key)
    return context


def _cluster_settings(where, entries, errors):
    """The [cluster] section whole: required keys, the node's default, TLS that loads."""
    import ssl
    values = {k: v for k, (_, v) in entries.items() if v is not None}
    if len(values) < len(entries):
        return None                             # each bad value has its error already
    missing = [k for k in ("etcd", "name") if k not in values]
    if missing:
        errors.append("%s: [cluster] needs %s" % (where, " and ".join(
            "%s = ..." % k for k in missing)))
        return None
    if "node" not in values:
        host = socket.gethostname()
        if not valid_name(host):
            errors.append("%s: [cluster] sets no node and the host name %r is not a valid "
                          "node name; set node = NAME" % (where, host))
            return None
        values["node"] = host
    settings = ClusterSettings(where=where, **values)
    tls = [k for k in ("etcd_ca", "etcd_cert", "etcd_key") if k in values]
    if tls and not any(u.startswith("https:") for u in settings.etcd):
        errors.append("%s: %s set, but every etcd endpoint is http:// (TLS files go with "
                      "https:// endpoints)" % (entries[tls[0]][0], tls[0]))
    elif settings.etcd_key and not settings.etcd_cert:
        errors.append("%s: etcd_key without etcd_cert" % entries["etcd_key"][0])
    elif tls:
        try:
            etcd_ssl_context(settings)
        except (ssl.SSLError, OSError) as exc:
            key = "etcd_cert" if settings.etcd_cert else "etcd_ca"
            errors.append("%s: cannot load the TLS files: %s" % (
                entries[key][0] if key in entries else where, exc))
    return settings
