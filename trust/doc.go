// Package trust is who Stowage's processes are to each other: a small
// certificate authority owned by the controller, X.509 identities bound to
// a role (the controller, or one host by id), rotating key pairs, the TLS
// configurations that demand them, and one-time join tokens.
//
// The model is Kubernetes' kubelet TLS bootstrap and SPIFFE's identities,
// built from crypto/tls and crypto/x509 only:
//
//   - The controller's CA (ECDSA P-256) is created on first start in its
//     data directory (pki/ca.crt, pki/ca.key 0600), or supplied by the
//     operator in the same files.
//   - Every certificate names its holder in one URI SAN:
//     spiffe://stowage/controller or spiffe://stowage/host/<host id>. Peers
//     are checked by that identity and the CA's signature, not by DNS name,
//     so the controller knows which host it is talking to whatever address
//     the host advertises. Host certificates also carry the addresses the
//     host advertises (IP/DNS SANs) so ordinary clients (other agents
//     copying from an HTTPS export, qemu or nbdinfo over NBD TLS) verify
//     them the usual way.
//   - An agent without a certificate joins with a join token
//     (stj_<id>.<secret>, one-time, expiring, stored hashed) and the CA's
//     public-key pin (sha256:<hex> of its SubjectPublicKeyInfo, as kubeadm's
//     --discovery-token-ca-cert-hash): it checks the pin before sending the
//     token, so the token only ever goes to the real controller. The
//     controller signs a CSR for the host id the token admits.
//   - Key pairs rotate before they expire without a restart: a KeyPair is
//     read by tls.Config callbacks on every handshake and swapped in place.
package trust
