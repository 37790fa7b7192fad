/* SMTP load generator in C: the submission scenarios of bench/smtp_load.py
 * (STARTTLS or implicit TLS, AUTH PLAIN or CRAM-MD5, N messages a session)
 * and plain MX sessions, at a fraction of the Python generator's CPU: TLS in
 * Python costs the generator ~0.6-0.9 ms a message, which on a 2-core machine
 * takes the core the servers under test would use.
 *
 * One thread a client, blocking sockets, pipelined MAIL/RCPT/DATA (one round
 * trip), then the body (a second). Prints one JSON line like smtp_load.py:
 * messages, seconds, messages_per_second, sessions, acked, errors, resumed.
 *
 *   cc -O2 -o smtp_load bench/smtp_load.c -lssl -lcrypto -lpthread
 *   smtp_load --port 2587 --submission alice:secret --per-session 10 --messages 2000 --concurrency 10
 *   smtp_load --port 2525 --starttls --per-session 10      (MX sessions in TLS, no AUTH)
 *
 * bench/run.py builds it on first use (`--generator c`); it needs gcc and
 * libssl-dev (Debian).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/ssl.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static struct {
    const char *host, *user, *password, *sender, *recipient;
    int port, messages, concurrency, size, per_session, implicit_tls, cram_md5, tls_resume, starttls;
} plan = {"127.0.0.1", NULL, NULL, "bench@example.net", "alice@example.org", 0, 1000, 10, 10240, 0, 0, 0, 0, 0};

static SSL_CTX *context;
static char *payload, *envelope;
static size_t payload_length, envelope_length;
static pthread_mutex_t totals_lock = PTHREAD_MUTEX_INITIALIZER;
static long total_acked, total_sessions, total_resumed;

typedef struct {
    int fd;
    SSL *ssl;
    char buffer[4096];
    size_t start, end;
} connection;

static void fail(const char *format, ...) {
    va_list args;
    va_start(args, format);
    fprintf(stderr, "smtp_load: ");
    vfprintf(stderr, format, args);
    fprintf(stderr, "\n");
    va_end(args);
    exit(1);
}

static void send_all(connection *c, const char *data, size_t length) {
    while (length > 0) {
        ssize_t n = c->ssl ? SSL_write(c->ssl, data, (int)length) : send(c->fd, data, length, MSG_NOSIGNAL);
        if (n <= 0) fail("send: %s", c->ssl ? "TLS write failed" : strerror(errno));
        data += n;
        length -= (size_t)n;
    }
}

static void send_text(connection *c, const char *text) { send_all(c, text, strlen(text)); }

/* One line (without CRLF) into line; fails on EOF. */
static void read_line(connection *c, char *line, size_t room) {
    size_t used = 0;
    for (;;) {
        while (c->start < c->end) {
            char ch = c->buffer[c->start++];
            if (ch == '\n') {
                if (used > 0 && line[used - 1] == '\r') used--;
                line[used] = 0;
                return;
            }
            if (used + 1 < room) line[used++] = ch;
        }
        ssize_t n = c->ssl ? SSL_read(c->ssl, c->buffer, sizeof c->buffer)
                           : recv(c->fd, c->buffer, sizeof c->buffer, 0);
        if (n <= 0) fail("the server closed the connection");
        c->start = 0;
        c->end = (size_t)n;
    }
}

/* The code of a (possibly multi-line) reply; its last line in last, if given. */
static int read_reply(connection *c, char *last, size_t room) {
    char line[1024];
    do read_line(c, line, sizeof line);
    while (strlen(line) > 3 && line[3] == '-');
    if (last) snprintf(last, room, "%s", line);
    return atoi(line);
}

static void start_tls(connection *c, SSL_SESSION *offered) {
    c->ssl = SSL_new(context);
    SSL_set_fd(c->ssl, c->fd);
    if (offered) SSL_set_session(c->ssl, offered);
    if (SSL_connect(c->ssl) != 1) fail("TLS handshake failed");
}

static void expect(connection *c, int code, const char *what) {
    int got = read_reply(c, NULL, 0);
    if (got != code) fail("%s: %d, expected %d", what, got, code);
}

static void log_in(connection *c) {
    unsigned char raw[512], encoded[1024];
    if (plan.cram_md5) {
        char line[1024];
        send_text(c, "AUTH CRAM-MD5\r\n");
        if (read_reply(c, line, sizeof line) != 334) fail("CRAM-MD5 refused");
        int challenge_length = EVP_DecodeBlock(raw, (unsigned char *)line + 4, (int)strlen(line + 4));
        if (challenge_length < 0) fail("bad CRAM-MD5 challenge");
        while (challenge_length > 0 && raw[challenge_length - 1] == 0) challenge_length--;  /* base64 padding */
        unsigned char digest[EVP_MAX_MD_SIZE];
        unsigned int digest_length = 0;
        HMAC(EVP_md5(), plan.password, (int)strlen(plan.password), raw, (size_t)challenge_length, digest,
             &digest_length);
        int n = snprintf((char *)raw, sizeof raw, "%s ", plan.user);
        for (unsigned int i = 0; i < digest_length; i++) n += snprintf((char *)raw + n, sizeof raw - n, "%02x", digest[i]);
        EVP_EncodeBlock(encoded, raw, n);
        send_text(c, (char *)encoded);
        send_text(c, "\r\n");
    } else {
        size_t user = strlen(plan.user), password = strlen(plan.password);
        raw[0] = 0;
        memcpy(raw + 1, plan.user, user);
        raw[1 + user] = 0;
        memcpy(raw + 2 + user, plan.password, password);
        EVP_EncodeBlock(encoded, raw, (int)(2 + user + password));
        send_text(c, "AUTH PLAIN ");
        send_text(c, (char *)encoded);
        send_text(c, "\r\n");
    }
    expect(c, 235, "AUTH");
}

static void open_session(connection *c, SSL_SESSION *offered) {
    struct sockaddr_in address = {.sin_family = AF_INET, .sin_port = htons((uint16_t)plan.port)};
    if (inet_pton(AF_INET, plan.host, &address.sin_addr) != 1) fail("--host must be an IPv4 address");
    memset(c, 0, sizeof *c);
    c->fd = socket(AF_INET, SOCK_STREAM, 0);
    int one = 1;
    setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (connect(c->fd, (struct sockaddr *)&address, sizeof address) != 0) fail("connect: %s", strerror(errno));
    if (plan.implicit_tls) start_tls(c, offered);
    expect(c, 220, "greeting");
    send_text(c, "EHLO bench.example.net\r\n");
    expect(c, 250, "EHLO");
    if ((plan.user || plan.starttls) && !plan.implicit_tls) {
        send_text(c, "STARTTLS\r\n");
        expect(c, 220, "STARTTLS");
        start_tls(c, offered);
        send_text(c, "EHLO bench.example.net\r\n");
        expect(c, 250, "EHLO after STARTTLS");
    }
    if (plan.user) log_in(c);
}

/* Ends the session; returns its TLS session for the next one (--tls-resume), or NULL. */
static SSL_SESSION *close_session(connection *c) {
    send_text(c, "QUIT\r\n");
    expect(c, 221, "QUIT");
    SSL_SESSION *kept = NULL;
    if (c->ssl) {
        if (plan.tls_resume) kept = SSL_get1_session(c->ssl);  /* TLS 1.3 tickets came with the replies */
        SSL_free(c->ssl);
    }
    close(c->fd);
    return kept;
}

static void *client(void *argument) {
    long count = (long)argument, sent = 0, acked = 0, sessions = 0, resumed = 0;
    long per_session = plan.per_session > 0 ? plan.per_session : count;
    SSL_SESSION *offered = NULL;
    connection c;
    while (sent < count) {
        open_session(&c, offered);
        sessions++;
        if (offered && c.ssl && SSL_session_reused(c.ssl)) resumed++;
        if (offered) SSL_SESSION_free(offered);
        for (long i = 0; i < per_session && sent < count; i++, sent++) {
            send_all(&c, envelope, envelope_length);
            int mail = read_reply(&c, NULL, 0), rcpt = read_reply(&c, NULL, 0), data = read_reply(&c, NULL, 0);
            if (mail != 250 || rcpt != 250 || data != 354) {
                send_text(&c, "RSET\r\n");
                read_reply(&c, NULL, 0);
                continue;
            }
            send_all(&c, payload, payload_length);
            if (read_reply(&c, NULL, 0) == 250) acked++;
        }
        offered = close_session(&c);
    }
    if (offered) SSL_SESSION_free(offered);
    pthread_mutex_lock(&totals_lock);
    total_acked += acked;
    total_sessions += sessions;
    total_resumed += resumed;
    pthread_mutex_unlock(&totals_lock);
    return NULL;
}

static void make_payload(void) {
    const char *header = "From: bench@example.net\r\nTo: alice@example.org\r\nSubject: bench 0\r\n\r\n";
    size_t header_length = strlen(header), line = 78;
    size_t lines = plan.size > (int)header_length ? (plan.size - header_length) / line : 1;
    if (lines < 1) lines = 1;
    payload_length = header_length + lines * line + 3;
    payload = malloc(payload_length + 1);
    memcpy(payload, header, header_length);
    for (size_t i = 0; i < lines; i++) {
        memset(payload + header_length + i * line, 'x', 76);
        memcpy(payload + header_length + i * line + 76, "\r\n", 2);
    }
    memcpy(payload + header_length + lines * line, ".\r\n", 3);
    envelope_length = (size_t)asprintf(&envelope, "MAIL FROM:<%s>\r\nRCPT TO:<%s>\r\nDATA\r\n", plan.sender,
                                       plan.recipient);
}

int main(int argc, char **argv) {
    for (int i = 1; i < argc; i++) {
        const char *name = argv[i], *value = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(name, "--implicit-tls")) { plan.implicit_tls = 1; continue; }
        if (!strcmp(name, "--tls-resume")) { plan.tls_resume = 1; continue; }
        if (!strcmp(name, "--starttls")) { plan.starttls = 1; continue; }  /* without --submission: an MX session */
        if (!value) fail("%s needs a value", name);
        i++;
        if (!strcmp(name, "--host")) plan.host = value;
        else if (!strcmp(name, "--port")) plan.port = atoi(value);
        else if (!strcmp(name, "--messages")) plan.messages = atoi(value);
        else if (!strcmp(name, "--concurrency")) plan.concurrency = atoi(value);
        else if (!strcmp(name, "--size")) plan.size = atoi(value);
        else if (!strcmp(name, "--per-session")) plan.per_session = atoi(value);
        else if (!strcmp(name, "--sender")) plan.sender = value;
        else if (!strcmp(name, "--recipient")) plan.recipient = value;
        else if (!strcmp(name, "--processes")) continue;  /* smtp_load.py's; one process of threads here */
        else if (!strcmp(name, "--auth")) plan.cram_md5 = !strcmp(value, "cram-md5");
        else if (!strcmp(name, "--submission")) {
            char *copy = strdup(value), *colon = strchr(copy, ':');
            if (!colon) fail("--submission USER:PASSWORD");
            *colon = 0;
            plan.user = copy;
            plan.password = colon + 1;
        } else fail("unknown option %s", name);
    }
    if (plan.port <= 0 || plan.concurrency <= 0 || plan.messages <= 0) fail("--port, --messages and --concurrency");
    if (plan.concurrency > plan.messages) plan.concurrency = plan.messages;
    if (plan.implicit_tls || plan.user || plan.starttls) {
        context = SSL_CTX_new(TLS_client_method());
        SSL_CTX_set_verify(context, SSL_VERIFY_NONE, NULL);  /* the servers' certificates are self-signed */
        SSL_CTX_set_session_cache_mode(context, SSL_SESS_CACHE_CLIENT);
    }
    make_payload();
    pthread_t *threads = calloc((size_t)plan.concurrency, sizeof *threads);
    struct timespec started, ended;
    clock_gettime(CLOCK_MONOTONIC, &started);
    for (int i = 0; i < plan.concurrency; i++) {
        long share = plan.messages / plan.concurrency + (i < plan.messages % plan.concurrency ? 1 : 0);
        pthread_attr_t attributes;
        pthread_attr_init(&attributes);
        pthread_attr_setstacksize(&attributes, 256 * 1024);
        if (pthread_create(&threads[i], &attributes, client, (void *)share) != 0) fail("pthread_create");
    }
    for (int i = 0; i < plan.concurrency; i++) pthread_join(threads[i], NULL);
    clock_gettime(CLOCK_MONOTONIC, &ended);
    double seconds = (double)(ended.tv_sec - started.tv_sec) + (double)(ended.tv_nsec - started.tv_nsec) / 1e9;
    printf("{\"messages\": %d, \"seconds\": %.3f, \"messages_per_second\": %.1f, \"sessions\": %ld, "
           "\"acked\": %ld, \"errors\": %ld%s",
           plan.messages, seconds, plan.messages / seconds, total_sessions, total_acked,
           plan.messages - total_acked, plan.tls_resume ? ", \"resumed\": " : "");
    if (plan.tls_resume) printf("%ld", total_resumed);
    printf("}\n");
    return 0;
}
