// kmsclient talks to a KMS plugin the way kube-apiserver does, with grpc-go (Debian's
// golang-google-grpc-dev), and applies the checks the apiserver applies to every answer.
// It is the project's independent KMS client: nothing here shares code with the plugin.
//
// The dial copies k8s.io/apiserver's envelope gRPC services (kmsv2 and the v1 client):
// grpc.Dial(socketPath) with insecure transport credentials, WaitForReady, and a custom
// dialer that ignores the address and dials the Unix socket. Which :authority grpc-go
// sends is chosen by -authority:
//
//	path       no override: grpc-go sends the target, the socket path (apiservers before
//	           the kmsv2 authority fix, every KMS v1 client)
//	escaped    the percent-encoded path, what grpc-go >= 1.57 sends for the same dial
//	localhost  grpc.WithAuthority("localhost"), as kube-apiserver does since the fix
//
// Exit status 0 when every check passed; otherwise the first failure is printed.
package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/json"
	"flag"
	"fmt"
	"net"
	"net/url"
	"os"
	"regexp"
	"strings"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/health/grpc_health_v1"

	v1 "edgeseal/kmspb/v1beta1"
	v2 "edgeseal/kmspb/v2"
)

// kube-apiserver's limits (k8s.io/apiserver/pkg/storage/value/encrypt/envelope/kmsv2).
const (
	maxKeyIDSize           = 1024
	maxCiphertextSize      = 1024
	maxAnnotationBytes     = 32 * 1024
	dns1123Label           = `[a-z0-9]([-a-z0-9]*[a-z0-9])?`
	callTimeout            = 3 * time.Second
	kmsV1APIVersion        = "v1beta1"
	defaultConcurrentCalls = 8
)

var dns1123Subdomain = regexp.MustCompile(`^` + dns1123Label + `(\.` + dns1123Label + `)*$`)

type summary struct {
	Authority   string `json:"authority"`
	GrpcVersion string `json:"grpc_go_version"`
	KeyID       string `json:"key_id,omitempty"`
	Version     string `json:"status_version,omitempty"`
	RoundTrips  int    `json:"round_trips"`
	V1RoundTrip int    `json:"v1beta1_round_trips"`
	Health      string `json:"health,omitempty"`
	Verified    int    `json:"verified,omitempty"`
}

// sample is one Encrypt kept to be decrypted by a later run (after a rotation, a restart).
type sample struct {
	Seed        []byte            `json:"seed"`
	Ciphertext  []byte            `json:"ciphertext"`
	KeyID       string            `json:"key_id"`
	Annotations map[string][]byte `json:"annotations"`
}

func writeSamples(path string, samples []sample) {
	data, err := json.Marshal(samples)
	if err != nil {
		fail("encoding samples: %v", err)
	}
	if err := os.WriteFile(path, data, 0o600); err != nil {
		fail("writing %s: %v", path, err)
	}
}

// verifySamples decrypts every saved sample as the apiserver decrypts a stored object:
// with the key id and annotations it stored next to the ciphertext.
func verifySamples(client v2.KeyManagementServiceClient, path string) int {
	data, err := os.ReadFile(path)
	if err != nil {
		fail("reading %s: %v", path, err)
	}
	var samples []sample
	if err := json.Unmarshal(data, &samples); err != nil {
		fail("parsing %s: %v", path, err)
	}
	for i, s := range samples {
		c, cancel := ctx()
		dec, err := client.Decrypt(c, &v2.DecryptRequest{Ciphertext: s.Ciphertext, Uid: uid(), KeyId: s.KeyID, Annotations: s.Annotations})
		cancel()
		if err != nil {
			fail("Decrypt of saved sample %d (key %s): %v", i, s.KeyID, err)
		}
		if !bytes.Equal(dec.Plaintext, s.Seed) {
			fail("Decrypt of saved sample %d: plaintext differs", i)
		}
	}
	return len(samples)
}

func main() {
	socket := flag.String("socket", "", "the plugin's Unix socket (a path, or @name for an abstract socket)")
	authority := flag.String("authority", "path", "the :authority to send: path, escaped or localhost")
	rounds := flag.Int("rounds", 200, "Encrypt/Decrypt round trips over KMS v2")
	checks := flag.String("checks", "health,v2", "comma-separated: health, v2, v1beta1")
	save := flag.String("save", "", "write the v2 round trips (seed, ciphertext, key id, annotations) to this JSON file")
	verify := flag.String("verify", "", "first decrypt every sample a run with -save wrote to this file")
	flag.Parse()
	if *socket == "" {
		fail("-socket is required")
	}
	conn, sent, err := dial(*socket, *authority)
	if err != nil {
		fail("dialling %s: %v", *socket, err)
	}
	defer conn.Close()
	out := summary{Authority: sent, GrpcVersion: grpc.Version}
	if *verify != "" {
		out.Verified = verifySamples(v2.NewKeyManagementServiceClient(conn), *verify)
	}
	for _, c := range strings.Split(*checks, ",") {
		switch c {
		case "health":
			out.Health = checkHealth(conn)
		case "v2":
			var samples []sample
			out.KeyID, out.Version, samples = checkV2(conn, *rounds)
			out.RoundTrips = *rounds
			if *save != "" {
				writeSamples(*save, samples)
			}
		case "v1beta1":
			out.V1RoundTrip = checkV1(conn)
		default:
			fail("unknown check %q", c)
		}
	}
	line, _ := json.Marshal(out)
	fmt.Println(string(line))
}

func fail(format string, args ...interface{}) {
	fmt.Fprintf(os.Stderr, "kmsclient: "+format+"\n", args...)
	os.Exit(1)
}

// dial returns the connection and the :authority grpc-go will send on it.
func dial(socket, mode string) (*grpc.ClientConn, string, error) {
	opts := []grpc.DialOption{
		grpc.WithInsecure(),
		grpc.WithDefaultCallOptions(grpc.WaitForReady(true)),
		grpc.WithContextDialer(func(context.Context, string) (net.Conn, error) {
			// The address grpc-go passes is ignored, as the apiserver ignores it.
			return net.DialUnix("unix", nil, &net.UnixAddr{Name: socket, Net: "unix"})
		}),
	}
	sent := socket
	switch mode {
	case "path":
	case "escaped":
		sent = url.PathEscape(socket)
		opts = append(opts, grpc.WithAuthority(sent))
	case "localhost":
		sent = "localhost"
		opts = append(opts, grpc.WithAuthority(sent))
	default:
		return nil, "", fmt.Errorf("unknown -authority %q (path, escaped or localhost)", mode)
	}
	conn, err := grpc.Dial(socket, opts...)
	return conn, sent, err
}

func ctx() (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.Background(), callTimeout)
}

func checkHealth(conn *grpc.ClientConn) string {
	c, cancel := ctx()
	defer cancel()
	r, err := grpc_health_v1.NewHealthClient(conn).Check(c, &grpc_health_v1.HealthCheckRequest{})
	if err != nil {
		fail("grpc.health.v1.Health/Check: %v", err)
	}
	if r.Status != grpc_health_v1.HealthCheckResponse_SERVING {
		fail("grpc.health.v1.Health/Check: status %v, want SERVING", r.Status)
	}
	return r.Status.String()
}

// status applies the apiserver's Status checks and returns (key_id, version).
func status(client v2.KeyManagementServiceClient) (string, string) {
	c, cancel := ctx()
	defer cancel()
	r, err := client.Status(c, &v2.StatusRequest{})
	if err != nil {
		fail("Status: %v", err)
	}
	if r.Healthz != "ok" {
		fail("Status: healthz %q, want \"ok\"", r.Healthz)
	}
	if r.Version != "v2" && r.Version != "v2beta1" {
		fail("Status: version %q, want v2 or v2beta1", r.Version)
	}
	if err := validateKeyID(r.KeyId); err != nil {
		fail("Status: %v", err)
	}
	return r.KeyId, r.Version
}

func validateKeyID(id string) error {
	if id == "" {
		return fmt.Errorf("keyID is empty")
	}
	if len(id) > maxKeyIDSize {
		return fmt.Errorf("keyID is %d bytes, more than %d", len(id), maxKeyIDSize)
	}
	return nil
}

// validateAnnotations is the apiserver's rule: every key a DNS-1123 subdomain with at
// least two labels, keys and values at most 32 KiB in total.
func validateAnnotations(a map[string][]byte) error {
	total := 0
	for k, v := range a {
		if len(k) > 253 || !dns1123Subdomain.MatchString(k) || !strings.Contains(k, ".") {
			return fmt.Errorf("annotation key %q is not a fully qualified DNS-1123 subdomain", k)
		}
		total += len(k) + len(v)
	}
	if total > maxAnnotationBytes {
		return fmt.Errorf("annotations are %d bytes, more than %d", total, maxAnnotationBytes)
	}
	return nil
}

func uid() string {
	b := make([]byte, 16)
	if _, err := rand.Read(b); err != nil {
		fail("reading random bytes: %v", err)
	}
	return fmt.Sprintf("%x-%x-%x-%x-%x", b[:4], b[4:6], b[6:8], b[8:10], b[10:])
}

func checkV2(conn *grpc.ClientConn, rounds int) (string, string, []sample) {
	client := v2.NewKeyManagementServiceClient(conn)
	keyID, version := status(client)
	// The apiserver calls the plugin from many goroutines over one connection.
	var wg sync.WaitGroup
	var mu sync.Mutex
	var samples []sample
	errs := make(chan error, rounds)
	work := make(chan int, rounds)
	for i := 0; i < rounds; i++ {
		work <- i
	}
	close(work)
	for w := 0; w < defaultConcurrentCalls; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range work {
				s, err := roundTrip(client, keyID)
				if err != nil {
					errs <- err
					continue
				}
				mu.Lock()
				samples = append(samples, s)
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		fail("%v", err)
	}
	// A tampered ciphertext must be refused, through this client too.
	seed := make([]byte, 32)
	rand.Read(seed)
	c, cancel := ctx()
	defer cancel()
	enc, err := client.Encrypt(c, &v2.EncryptRequest{Plaintext: seed, Uid: uid()})
	if err != nil {
		fail("Encrypt: %v", err)
	}
	enc.Ciphertext[len(enc.Ciphertext)-1] ^= 1
	if _, err := client.Decrypt(c, &v2.DecryptRequest{Ciphertext: enc.Ciphertext, Uid: uid(), KeyId: enc.KeyId, Annotations: enc.Annotations}); err == nil {
		fail("Decrypt of a tampered ciphertext succeeded")
	}
	if again, _ := status(client); again != keyID {
		fail("Status: key_id changed from %q to %q during the run", keyID, again)
	}
	return keyID, version, samples
}

func roundTrip(client v2.KeyManagementServiceClient, keyID string) (sample, error) {
	var none sample
	seed := make([]byte, 32)
	if _, err := rand.Read(seed); err != nil {
		return none, err
	}
	c, cancel := ctx()
	defer cancel()
	enc, err := client.Encrypt(c, &v2.EncryptRequest{Plaintext: seed, Uid: uid()})
	if err != nil {
		return none, fmt.Errorf("Encrypt: %v", err)
	}
	if len(enc.Ciphertext) == 0 || len(enc.Ciphertext) > maxCiphertextSize {
		return none, fmt.Errorf("Encrypt: ciphertext of %d bytes, want 1..%d", len(enc.Ciphertext), maxCiphertextSize)
	}
	if err := validateKeyID(enc.KeyId); err != nil {
		return none, fmt.Errorf("Encrypt: %v", err)
	}
	if enc.KeyId != keyID {
		return none, fmt.Errorf("Encrypt: keyID %q differs from Status' %q (the apiserver would discard the DEK)", enc.KeyId, keyID)
	}
	if err := validateAnnotations(enc.Annotations); err != nil {
		return none, fmt.Errorf("Encrypt: %v", err)
	}
	dec, err := client.Decrypt(c, &v2.DecryptRequest{Ciphertext: enc.Ciphertext, Uid: uid(), KeyId: enc.KeyId, Annotations: enc.Annotations})
	if err != nil {
		return none, fmt.Errorf("Decrypt: %v", err)
	}
	if !bytes.Equal(dec.Plaintext, seed) {
		return none, fmt.Errorf("Decrypt: plaintext differs from the seed encrypted")
	}
	return sample{Seed: seed, Ciphertext: enc.Ciphertext, KeyID: enc.KeyId, Annotations: enc.Annotations}, nil
}

// checkV1 is the KMS v1 client: Version first (it must say v1beta1), then round trips.
func checkV1(conn *grpc.ClientConn) int {
	client := v1.NewKeyManagementServiceClient(conn)
	c, cancel := ctx()
	defer cancel()
	ver, err := client.Version(c, &v1.VersionRequest{Version: kmsV1APIVersion})
	if err != nil {
		fail("v1beta1 Version: %v", err)
	}
	if ver.Version != kmsV1APIVersion {
		fail("v1beta1 Version: %q, want %q", ver.Version, kmsV1APIVersion)
	}
	if ver.RuntimeName == "" || ver.RuntimeVersion == "" {
		fail("v1beta1 Version: empty runtime name or version")
	}
	n := 20
	for i := 0; i < n; i++ {
		plain := make([]byte, 32)
		rand.Read(plain)
		enc, err := client.Encrypt(c, &v1.EncryptRequest{Version: kmsV1APIVersion, Plain: plain})
		if err != nil {
			fail("v1beta1 Encrypt: %v", err)
		}
		if len(enc.Cipher) == 0 {
			fail("v1beta1 Encrypt: empty cipher")
		}
		dec, err := client.Decrypt(c, &v1.DecryptRequest{Version: kmsV1APIVersion, Cipher: enc.Cipher})
		if err != nil {
			fail("v1beta1 Decrypt: %v", err)
		}
		if !bytes.Equal(dec.Plain, plain) {
			fail("v1beta1 Decrypt: plaintext differs")
		}
	}
	return n
}
