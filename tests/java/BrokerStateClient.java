// Reads /v1/broker-state/ the way Strimzi's cluster operator (KafkaAgentClient) does: Java's
// HttpClient, HTTP/2 preferred, mTLS with a PKCS12 client identity, hostname verification on,
// a 10 s timeout, and a strict parse of the body (unknown fields fail, integers must fit an int,
// never null). No external jars: the JSON parser below is a minimal strict one.
//
// The operator is a long-lived JVM: its TLS code is loaded and compiled long before it asks a
// broker's state. A fresh `java` would do all of that inside its first handshake with the agent
// (7 s in the emulated guests of the kernel matrix, against the agent's 10 s handshake deadline),
// so the client first sends one request over mutual TLS to a server of its own (see warmUp) and
// then the real one.
//
// Usage: java BrokerStateClient.java URL CA_PEM CLIENT_P12 P12_PASSWORD [TIMEOUT_SECONDS]
// Prints "<HTTP version> <status> brokerState=N[ logs=L segments=S]" and exits 0 on a 200 that
// parses; on any other status prints brokerState=-1 (the operator's "unknown") and exits 3;
// a body that does not parse strictly exits 2.

import java.io.FileInputStream;
import java.io.InputStream;
import java.net.InetAddress;
import java.net.InetSocketAddress;
import java.net.Socket;
import java.net.URI;
import java.net.http.HttpClient;
import java.net.http.HttpRequest;
import java.net.http.HttpResponse;
import java.nio.charset.StandardCharsets;
import java.security.KeyStore;
import java.security.cert.Certificate;
import java.security.cert.CertificateException;
import java.security.cert.CertificateFactory;
import java.security.cert.X509Certificate;
import java.time.Duration;
import java.util.ArrayList;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.Set;
import com.sun.net.httpserver.HttpsConfigurator;
import com.sun.net.httpserver.HttpsParameters;
import com.sun.net.httpserver.HttpsServer;
import javax.net.ssl.KeyManagerFactory;
import javax.net.ssl.SSLContext;
import javax.net.ssl.SSLEngine;
import javax.net.ssl.SSLParameters;
import javax.net.ssl.TrustManager;
import javax.net.ssl.TrustManagerFactory;
import javax.net.ssl.X509ExtendedTrustManager;

public class BrokerStateClient {
    public static void main(String[] args) throws Exception {
        if (args.length != 4 && args.length != 5) {
            System.err.println("usage: BrokerStateClient URL CA_PEM CLIENT_P12 PASSWORD [TIMEOUT_SECONDS]");
            System.exit(64);
        }
        char[] password = args[3].toCharArray();

        KeyStore trust = KeyStore.getInstance("PKCS12");
        trust.load(null, null);
        try (InputStream in = new FileInputStream(args[1])) {
            int i = 0;
            for (Certificate c : CertificateFactory.getInstance("X.509").generateCertificates(in)) {
                trust.setCertificateEntry("ca" + i++, c);
            }
        }
        TrustManagerFactory tmf = TrustManagerFactory.getInstance(TrustManagerFactory.getDefaultAlgorithm());
        tmf.init(trust);

        KeyStore identity = KeyStore.getInstance("PKCS12");
        try (InputStream in = new FileInputStream(args[2])) {
            identity.load(in, password);
        }
        KeyManagerFactory kmf = KeyManagerFactory.getInstance(KeyManagerFactory.getDefaultAlgorithm());
        kmf.init(identity, password);

        // The operator's 10 s; longer only where the test machine is emulated (the kernel matrix).
        long timeoutSeconds = args.length > 4 ? Long.parseLong(args[4]) : 10;
        SSLContext ssl = SSLContext.getInstance("TLS");
        ssl.init(kmf.getKeyManagers(), tmf.getTrustManagers(), null);

        long warming = System.nanoTime();
        warmUp(kmf, tmf);
        System.err.println("warm-up took " + (System.nanoTime() - warming) / 1_000_000 + " ms");

        HttpClient client = HttpClient.newBuilder()
                .version(HttpClient.Version.HTTP_2)
                .sslContext(ssl)
                .connectTimeout(Duration.ofSeconds(timeoutSeconds))
                .build();
        HttpRequest request = HttpRequest.newBuilder(URI.create(args[0]))
                .timeout(Duration.ofSeconds(timeoutSeconds))
                .GET()
                .build();
        long sent = System.nanoTime();
        HttpResponse<String> response;
        try {
            response = client.send(request, HttpResponse.BodyHandlers.ofString());
        } finally {
            // Connect, TLS handshake and exchange: what the agent's handshake deadline sees.
            System.err.println("send took " + (System.nanoTime() - sent) / 1_000_000 + " ms");
        }
        String prefix = response.version() + " " + response.statusCode() + " ";
        if (response.statusCode() != 200) {
            System.out.println(prefix + "brokerState=-1");
            System.err.println("body: " + response.body());
            System.exit(3);
        }
        try {
            Object parsed = new Parser(response.body()).parseDocument();
            Map<String, Object> top = object(parsed, "body", Set.of("brokerState", "recoveryState"));
            int state = integer(top.get("brokerState"), "brokerState");
            StringBuilder out = new StringBuilder(prefix + "brokerState=" + state);
            if (top.containsKey("recoveryState")) {
                Map<String, Object> r = object(top.get("recoveryState"), "recoveryState",
                        Set.of("remainingLogsToRecover", "remainingSegmentsToRecover"));
                out.append(" logs=").append(integer(r.get("remainingLogsToRecover"), "remainingLogsToRecover"));
                out.append(" segments=").append(integer(r.get("remainingSegmentsToRecover"), "remainingSegmentsToRecover"));
            }
            System.out.println(out);
        } catch (IllegalArgumentException e) {
            System.out.println(prefix + "unparseable");
            System.err.println("strict parse failed: " + e.getMessage() + " in " + response.body());
            System.exit(2);
        }
    }

    /**
     * One request of this JVM's HttpClient, built as the real one (HTTP/2 preferred; the JDK's
     * server answers in HTTP/1.1, so only the TLS path is warmed), to an HTTPS server of its own
     * on loopback, with mutual TLS: the server holds the client's identity and verifies the client
     * certificate against the CA as the agent does. The warm-up's client accepts the server's
     * certificate unchecked (it is the client's own, not a server's); the real request checks
     * the agent's certificate and host name. Fails loudly if the warm-up does not answer 200.
     */
    static void warmUp(KeyManagerFactory kmf, TrustManagerFactory tmf) throws Exception {
        SSLContext serverSide = SSLContext.getInstance("TLS");
        serverSide.init(kmf.getKeyManagers(), tmf.getTrustManagers(), null);
        HttpsServer server = HttpsServer.create(new InetSocketAddress(InetAddress.getLoopbackAddress(), 0), 0);
        server.setHttpsConfigurator(new HttpsConfigurator(serverSide) {
            @Override
            public void configure(HttpsParameters parameters) {
                SSLParameters ssl = serverSide.getDefaultSSLParameters();
                ssl.setNeedClientAuth(true);
                parameters.setSSLParameters(ssl);
            }
        });
        server.createContext("/", exchange -> {
            byte[] body = "{\"brokerState\":3}".getBytes(StandardCharsets.UTF_8);
            exchange.sendResponseHeaders(200, body.length);
            exchange.getResponseBody().write(body);
            exchange.close();
        });
        server.start();
        try {
            SSLContext clientSide = SSLContext.getInstance("TLS");
            clientSide.init(kmf.getKeyManagers(), new TrustManager[] { new AnyServer() }, null);
            HttpClient client = HttpClient.newBuilder()
                    .version(HttpClient.Version.HTTP_2)
                    .sslContext(clientSide)
                    .build();
            URI uri = URI.create("https://127.0.0.1:" + server.getAddress().getPort() + "/");
            HttpResponse<String> response = client.send(HttpRequest.newBuilder(uri).GET().build(),
                    HttpResponse.BodyHandlers.ofString());
            if (response.statusCode() != 200) {
                throw new IllegalStateException("the warm-up request got " + response.statusCode());
            }
        } finally {
            server.stop(0);
        }
    }

    /** The warm-up client's trust: any server certificate, no host name check; no client. */
    static final class AnyServer extends X509ExtendedTrustManager {
        @Override
        public void checkServerTrusted(X509Certificate[] chain, String auth) {
        }

        @Override
        public void checkServerTrusted(X509Certificate[] chain, String auth, Socket socket) {
        }

        @Override
        public void checkServerTrusted(X509Certificate[] chain, String auth, SSLEngine engine) {
        }

        @Override
        public void checkClientTrusted(X509Certificate[] chain, String auth) throws CertificateException {
            throw new CertificateException("the warm-up client trusts no client");
        }

        @Override
        public void checkClientTrusted(X509Certificate[] chain, String auth, Socket socket) throws CertificateException {
            throw new CertificateException("the warm-up client trusts no client");
        }

        @Override
        public void checkClientTrusted(X509Certificate[] chain, String auth, SSLEngine engine) throws CertificateException {
            throw new CertificateException("the warm-up client trusts no client");
        }

        @Override
        public X509Certificate[] getAcceptedIssuers() {
            return new X509Certificate[0];
        }
    }

    /** An object whose keys are all in `allowed` (unknown properties fail, as the operator's mapper does). */
    @SuppressWarnings("unchecked")
    static Map<String, Object> object(Object v, String what, Set<String> allowed) {
        if (!(v instanceof Map)) {
            throw new IllegalArgumentException(what + " is not an object");
        }
        Map<String, Object> m = (Map<String, Object>) v;
        for (String k : m.keySet()) {
            if (!allowed.contains(k)) {
                throw new IllegalArgumentException("unknown field " + k + " in " + what);
            }
        }
        return m;
    }

    /** A JSON integer that fits a Java int; null or absent fails. */
    static int integer(Object v, String what) {
        if (!(v instanceof Long)) {
            throw new IllegalArgumentException(what + " is not an integer: " + v);
        }
        long l = (Long) v;
        if (l < Integer.MIN_VALUE || l > Integer.MAX_VALUE) {
            throw new IllegalArgumentException(what + " does not fit an int: " + l);
        }
        return (int) l;
    }

    /** Strict JSON (RFC 8259) to Map/List/String/Long/Double/Boolean/null; duplicate keys fail. */
    static final class Parser {
        private final String s;
        private int i;

        Parser(String s) {
            this.s = s;
        }

        Object parseDocument() {
            Object v = value();
            ws();
            if (i != s.length()) {
                throw fail("trailing characters");
            }
            return v;
        }

        private IllegalArgumentException fail(String why) {
            return new IllegalArgumentException(why + " at offset " + i);
        }

        private void ws() {
            while (i < s.length() && " \t\r\n".indexOf(s.charAt(i)) >= 0) {
                i++;
            }
        }

        private Object value() {
            ws();
            if (i >= s.length()) {
                throw fail("unexpected end");
            }
            char c = s.charAt(i);
            switch (c) {
                case '{': return obj();
                case '[': return arr();
                case '"': return str();
                case 't': return literal("true", Boolean.TRUE);
                case 'f': return literal("false", Boolean.FALSE);
                case 'n': return literal("null", null);
                default:
                    if (c == '-' || (c >= '0' && c <= '9')) {
                        return num();
                    }
                    throw fail("unexpected '" + c + "'");
            }
        }

        private Object literal(String word, Object v) {
            if (!s.startsWith(word, i)) {
                throw fail("bad literal");
            }
            i += word.length();
            return v;
        }

        private Map<String, Object> obj() {
            Map<String, Object> m = new LinkedHashMap<>();
            i++;
            ws();
            if (i < s.length() && s.charAt(i) == '}') {
                i++;
                return m;
            }
            while (true) {
                ws();
                if (i >= s.length() || s.charAt(i) != '"') {
                    throw fail("expected a key");
                }
                String k = str();
                ws();
                expect(':');
                Object v = value();
                if (m.containsKey(k)) {
                    throw fail("duplicate key " + k);
                }
                m.put(k, v);
                ws();
                if (i < s.length() && s.charAt(i) == ',') {
                    i++;
                    continue;
                }
                expect('}');
                return m;
            }
        }

        private List<Object> arr() {
            List<Object> l = new ArrayList<>();
            i++;
            ws();
            if (i < s.length() && s.charAt(i) == ']') {
                i++;
                return l;
            }
            while (true) {
                l.add(value());
                ws();
                if (i < s.length() && s.charAt(i) == ',') {
                    i++;
                    continue;
                }
                expect(']');
                return l;
            }
        }

        private void expect(char c) {
            if (i >= s.length() || s.charAt(i) != c) {
                throw fail("expected '" + c + "'");
            }
            i++;
        }

        private String str() {
            expect('"');
            StringBuilder b = new StringBuilder();
            while (true) {
                if (i >= s.length()) {
                    throw fail("unterminated string");
                }
                char c = s.charAt(i++);
                if (c == '"') {
                    return b.toString();
                }
                if (c < 0x20) {
                    throw fail("control character in string");
                }
                if (c != '\\') {
                    b.append(c);
                    continue;
                }
                if (i >= s.length()) {
                    throw fail("unterminated escape");
                }
                char e = s.charAt(i++);
                switch (e) {
                    case '"': b.append('"'); break;
                    case '\\': b.append('\\'); break;
                    case '/': b.append('/'); break;
                    case 'b': b.append('\b'); break;
                    case 'f': b.append('\f'); break;
                    case 'n': b.append('\n'); break;
                    case 'r': b.append('\r'); break;
                    case 't': b.append('\t'); break;
                    case 'u':
                        if (i + 4 > s.length()) {
                            throw fail("short \\u escape");
                        }
                        b.append((char) Integer.parseInt(s.substring(i, i + 4), 16));
                        i += 4;
                        break;
                    default: throw fail("bad escape");
                }
            }
        }

        private Object num() {
            int start = i;
            if (s.charAt(i) == '-') {
                i++;
            }
            if (i >= s.length()) {
                throw fail("bad number");
            }
            if (s.charAt(i) == '0') {
                i++;
            } else if (s.charAt(i) >= '1' && s.charAt(i) <= '9') {
                while (i < s.length() && Character.isDigit(s.charAt(i))) {
                    i++;
                }
            } else {
                throw fail("bad number");
            }
            boolean integral = true;
            if (i < s.length() && s.charAt(i) == '.') {
                integral = false;
                i++;
                int d = i;
                while (i < s.length() && Character.isDigit(s.charAt(i))) {
                    i++;
                }
                if (d == i) {
                    throw fail("bad fraction");
                }
            }
            if (i < s.length() && (s.charAt(i) == 'e' || s.charAt(i) == 'E')) {
                integral = false;
                i++;
                if (i < s.length() && (s.charAt(i) == '+' || s.charAt(i) == '-')) {
                    i++;
                }
                int d = i;
                while (i < s.length() && Character.isDigit(s.charAt(i))) {
                    i++;
                }
                if (d == i) {
                    throw fail("bad exponent");
                }
            }
            String text = s.substring(start, i);
            if (!integral) {
                return Double.parseDouble(text);
            }
            try {
                return Long.parseLong(text);
            } catch (NumberFormatException e) {
                throw fail("integer out of range");
            }
        }
    }
}
