// oidc-peer: a real OIDC provider for the waypoint's RequestAuthentication
// tests. github.com/oauth2-proxy/mockoidc serves discovery and the JWKS
// over HTTPS (certificate and key from files the test's CA issued); a plain
// HTTP control listener lets the test mint tokens with the provider's
// current key, rotate that key, and take the JWKS endpoint down and up.
package main

import (
	"crypto/rand"
	"crypto/rsa"
	"crypto/tls"
	"encoding/json"
	"flag"
	"fmt"
	"log"
	"net"
	"net/http"
	"sync"
	"time"

	"github.com/golang-jwt/jwt/v5"
	"github.com/oauth2-proxy/mockoidc"
)

func main() {
	listen := flag.String("listen", "0.0.0.0:8443", "HTTPS address of the provider")
	control := flag.String("control", "127.0.0.1:9000", "plain HTTP control address")
	certFile := flag.String("cert", "", "PEM certificate")
	keyFile := flag.String("key", "", "PEM private key")
	issuer := flag.String("issuer", "", "iss of minted tokens (default: the provider's)")
	flag.Parse()

	cert, err := tls.LoadX509KeyPair(*certFile, *keyFile)
	if err != nil {
		log.Fatal(err)
	}
	m, err := mockoidc.NewServer(nil)
	if err != nil {
		log.Fatal(err)
	}
	var mu sync.RWMutex // guards m.Keypair and down
	down := false
	if err := m.AddMiddleware(func(next http.Handler) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			mu.RLock()
			defer mu.RUnlock()
			if down {
				http.Error(w, "down", http.StatusServiceUnavailable)
				return
			}
			next.ServeHTTP(w, r)
		})
	}); err != nil {
		log.Fatal(err)
	}
	ln, err := net.Listen("tcp", *listen)
	if err != nil {
		log.Fatal(err)
	}
	// mockoidc serves the listener it is given as is: TLS is ours to add.
	cfg := &tls.Config{Certificates: []tls.Certificate{cert}}
	if err := m.Start(tls.NewListener(ln, cfg), cfg); err != nil {
		log.Fatal(err)
	}
	iss := *issuer
	if iss == "" {
		iss = m.Issuer()
	}

	mux := http.NewServeMux()
	// POST a JSON object of claims: signed with the current key. iss, iat
	// and exp default to the provider's issuer, now and now+10m.
	mux.HandleFunc("/token", func(w http.ResponseWriter, r *http.Request) {
		claims := jwt.MapClaims{}
		if err := json.NewDecoder(r.Body).Decode(&claims); err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		now := time.Now()
		for k, v := range map[string]any{"iss": iss, "iat": now.Unix(), "exp": now.Add(10 * time.Minute).Unix()} {
			if _, ok := claims[k]; !ok {
				claims[k] = v
			}
		}
		mu.RLock()
		tok, err := m.Keypair.SignJWT(claims)
		mu.RUnlock()
		if err != nil {
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
		fmt.Fprint(w, tok)
	})
	// A new signing key (a new kid); the JWKS serves only the new one.
	mux.HandleFunc("/rotate", func(w http.ResponseWriter, r *http.Request) {
		key, err := rsa.GenerateKey(rand.Reader, 2048)
		if err == nil {
			var kp *mockoidc.Keypair
			if kp, err = mockoidc.NewKeypair(key); err == nil {
				mu.Lock()
				m.Keypair = kp
				mu.Unlock()
			}
		}
		if err != nil {
			http.Error(w, err.Error(), http.StatusInternalServerError)
		}
	})
	// /down and /up: the HTTPS endpoints answer 503 while down.
	for path, v := range map[string]bool{"/down": true, "/up": false} {
		v := v
		mux.HandleFunc(path, func(w http.ResponseWriter, r *http.Request) {
			mu.Lock()
			down = v
			mu.Unlock()
		})
	}
	mux.HandleFunc("/issuer", func(w http.ResponseWriter, r *http.Request) { fmt.Fprint(w, iss) })
	log.Printf("oidc peer: issuer %s, jwks %s", iss, m.JWKSEndpoint())
	log.Fatal(http.ListenAndServe(*control, mux))
}
