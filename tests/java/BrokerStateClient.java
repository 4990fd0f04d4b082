// Reads /v1/broker-state/ the way Strimzi's cluster operator (KafkaAgentClient) does: Java's
// HttpClient, HTTP/2 preferred, mTLS with a PKCS12 client identity, hostname verification on,
// a 10 s timeout, and a strict parse of the body (unknown fields fail, integers must fit an int,
// never null). No external jars: the JSON parser below is a minimal strict one.
//
// Usage: java BrokerStateClient.java URL CA_PEM CLIENT_P12 P12_PASSWORD [TIMEOUT_SECONDS]
// Prints "<HTTP version> <status> brokerState=N[ logs=L segments=S]" and exits 0 on a 200 that
// parses; on any other status prints brokerState=-1 (the operator's "unknown") and exits 3;
// a body that does not parse strictly exits 2.

import java.io.FileInputStream;
import java.io.InputStream;
import java.net.URI;
import java.net.http.HttpClient;
import java.net.http.HttpRequest;
import java.net.http.HttpResponse;
import java.security.KeyStore;
import java.security.cert.Certificate;
import java.security.cert.CertificateFactory;
import java.time.Duration;
import java.util.ArrayList;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.Set;
import javax.net.ssl.KeyManagerFactory;
import javax.net.ssl.SSLContext;
import javax.net.ssl.TrustManagerFactory;

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

        HttpClient client = HttpClient.newBuilder()
                .version(HttpClient.Version.HTTP_2)
                .sslContext(ssl)
                .connectTimeout(Duration.ofSeconds(timeoutSeconds))
                .build();
        HttpRequest request = HttpRequest.newBuilder(URI.create(args[0]))
                .timeout(Duration.ofSeconds(timeoutSeconds))
                .GET()
                .build();
        HttpResponse<String> response = client.send(request, HttpResponse.BodyHandlers.ofString());
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
