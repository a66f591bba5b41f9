//! The crypto provider jsonwebtoken runs on: its own aws-lc-rs provider, except that RSA public keys are
//! parsed once. jsonwebtoken hands the verifier factory a `DecodingKey` for every token, and its provider
//! builds the RSA key (and, at its first signature, its Montgomery constants) from `n` and `e` each time:
//! about a fifth of an RS256 check. This provider verifies with keys parsed once when an issuer's key set
//! is loaded ([`keep`]); any other key (a DPoP proof's own) goes to jsonwebtoken's verifier as before.
//! Parsing, claims and every other algorithm stay jsonwebtoken's, on aws-lc-rs; the signature check is
//! aws-lc-rs's.

use std::sync::{Arc, LazyLock};

use arc_swap::ArcSwap;
use aws_lc_rs::signature::{self as sig, ParsedPublicKey, RsaParameters, RsaPublicKeyComponents};
use jsonwebtoken::crypto::{CryptoProvider, JwtVerifier, aws_lc};
use jsonwebtoken::errors::{Error, ErrorKind};
use jsonwebtoken::signature::{self, Verifier};
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey, DecodingKeyKind};

/// jsonwebtoken's aws-lc-rs provider with [`verifier`] in place of its verifier factory.
pub static PROVIDER: LazyLock<CryptoProvider> =
    LazyLock::new(|| CryptoProvider { verifier_factory: verifier, ..aws_lc::DEFAULT_PROVIDER.clone() });

/// Makes [`PROVIDER`] jsonwebtoken's provider for this process. It has to come before jsonwebtoken's
/// first use, which otherwise settles on its default (correct, only slower); later calls do nothing.
pub fn install() {
    let _ = PROVIDER.install_default();
}

/// How many parsed keys are kept: issuers publish a few keys each. Past this (keys rotated very often),
/// the list starts again empty rather than grow.
const MAX_KEYS: usize = 64;

#[derive(Clone)]
struct Parsed {
    alg: Algorithm,
    n: Vec<u8>,
    e: Vec<u8>,
    key: Arc<ParsedPublicKey>,
}

/// A short list, searched without allocating or hashing the modulus; swapped whole when a key is added.
static PARSED: LazyLock<ArcSwap<Vec<Parsed>>> = LazyLock::new(Default::default);

fn cached(alg: Algorithm, n: &[u8], e: &[u8]) -> Option<Arc<ParsedPublicKey>> {
    PARSED.load().iter().find(|p| p.alg == alg && p.e == e && p.n == n).map(|p| p.key.clone())
}

fn rsa_parameters(alg: Algorithm) -> Option<&'static RsaParameters> {
    // The same parameters as jsonwebtoken's aws-lc-rs verifiers: keys of 2048 to 8192 bits.
    Some(match alg {
        Algorithm::RS256 => &sig::RSA_PKCS1_2048_8192_SHA256,
        Algorithm::RS384 => &sig::RSA_PKCS1_2048_8192_SHA384,
        Algorithm::RS512 => &sig::RSA_PKCS1_2048_8192_SHA512,
        Algorithm::PS256 => &sig::RSA_PSS_2048_8192_SHA256,
        Algorithm::PS384 => &sig::RSA_PSS_2048_8192_SHA384,
        Algorithm::PS512 => &sig::RSA_PSS_2048_8192_SHA512,
        _ => return None,
    })
}

fn verifier(alg: &Algorithm, key: &DecodingKey) -> Result<Box<dyn JwtVerifier>, Error> {
    let (Some(_), DecodingKeyKind::RsaModulusExponent { n, e }) = (rsa_parameters(*alg), key.kind()) else {
        return (aws_lc::DEFAULT_PROVIDER.verifier_factory)(alg, key);
    };
    if key.family() != AlgorithmFamily::Rsa {
        return Err(ErrorKind::InvalidKeyFormat.into());
    }
    match cached(*alg, n, e) {
        Some(key) => Ok(Box::new(ParsedRsa { alg: *alg, key })),
        // Not from an issuer's key set (a DPoP proof's own key, say): parsed for this signature only, so
        // keys a client makes up never enter the list.
        None => (aws_lc::DEFAULT_PROVIDER.verifier_factory)(alg, key),
    }
}

/// Parses `key` once for each RSA algorithm in `algorithms`, for the verifications to come. Called for
/// the keys of an issuer's key set, as it is loaded.
pub(crate) fn keep(key: &DecodingKey, algorithms: &[Algorithm]) {
    let DecodingKeyKind::RsaModulusExponent { n, e } = key.kind() else {
        return;
    };
    for &alg in algorithms {
        let Some(params) = rsa_parameters(alg) else { continue };
        if cached(alg, n, e).is_some() {
            continue;
        }
        // A key aws-lc-rs refuses stays out; jsonwebtoken's own verifier then refuses its tokens.
        let Ok(parsed) = (RsaPublicKeyComponents { n: &n[..], e: &e[..] }).to_parsed_public_key(params)
        else {
            continue;
        };
        let parsed = Arc::new(parsed);
        PARSED.rcu(|list| {
            let keep = if list.len() >= MAX_KEYS { &[][..] } else { &list[..] };
            let mut list = keep.to_vec();
            list.push(Parsed { alg, n: n.clone(), e: e.clone(), key: parsed.clone() });
            list
        });
    }
}

struct ParsedRsa {
    alg: Algorithm,
    key: Arc<ParsedPublicKey>,
}

impl Verifier<Vec<u8>> for ParsedRsa {
    fn verify(&self, msg: &[u8], signature: &Vec<u8>) -> Result<(), signature::Error> {
        self.key.verify_sig(msg, signature).map_err(signature::Error::from_source)
    }
}

impl JwtVerifier for ParsedRsa {
    fn algorithm(&self) -> Algorithm {
        self.alg
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{EncodingKey, Header, Validation};
    use serde_json::{Value, json};

    fn rsa_key() -> (EncodingKey, DecodingKey) {
        let pair =
            rcgen::KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA256, rcgen::RsaKeySize::_2048).unwrap();
        let encoding = EncodingKey::from_rsa_pem(pair.serialize_pem().as_bytes()).unwrap();
        // Through a JWK, as keys arrive from a JWKS: `n` and `e`.
        let jwk = jsonwebtoken::jwk::Jwk::from_encoding_key(&encoding, Algorithm::RS256).unwrap();
        let decoding = DecodingKey::from_jwk(&jwk).unwrap();
        assert!(matches!(decoding.kind(), DecodingKeyKind::RsaModulusExponent { .. }));
        (encoding, decoding)
    }

    /// The provider's verifier, driven the way jsonwebtoken drives it, whatever provider this test
    /// process installed first.
    fn check(alg: Algorithm, token: &str, key: &DecodingKey) -> bool {
        let (signing_input, signature) = token.rsplit_once('.').unwrap();
        let signature = base64::Engine::decode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, signature);
        let v = verifier(&alg, key).unwrap();
        signature.is_ok_and(|s| v.verify(signing_input.as_bytes(), &s).is_ok())
    }

    #[test]
    fn parsed_keys_verify_what_jsonwebtoken_verifies() {
        let (enc, dec) = rsa_key();
        let (other_enc, other) = rsa_key();
        let all = [Algorithm::RS256, Algorithm::RS384, Algorithm::RS512, Algorithm::PS256, Algorithm::PS512];
        keep(&dec, &all);
        let claims = json!({"sub": "a", "exp": 4_000_000_000u64});
        for alg in [Algorithm::RS256, Algorithm::RS384, Algorithm::RS512, Algorithm::PS256, Algorithm::PS512]
        {
            let token = jsonwebtoken::encode(&Header::new(alg), &claims, &enc).unwrap();
            // Twice: the first parses the key, the second takes it from the cache.
            assert!(check(alg, &token, &dec), "{alg:?}");
            assert!(check(alg, &token, &dec), "{alg:?} (cached key)");
            let DecodingKeyKind::RsaModulusExponent { n, e } = dec.kind() else { unreachable!() };
            assert!(cached(alg, n, e).is_some(), "{alg:?} key not kept");
            assert!(!check(alg, &token, &other), "{alg:?} verified with another key");
            let mut tampered = token.clone().into_bytes();
            let at = token.find('.').unwrap() + 3;
            tampered[at] = if tampered[at] == b'A' { b'B' } else { b'A' };
            assert!(!check(alg, std::str::from_utf8(&tampered).unwrap(), &dec), "{alg:?} tampered");
            // A PKCS#1 v1.5 signature is not a PSS one, nor the reverse.
            let swapped = match alg {
                Algorithm::RS256 => Algorithm::PS256,
                Algorithm::PS256 => Algorithm::RS256,
                _ => continue,
            };
            assert!(!check(swapped, &token, &dec), "{alg:?} accepted as {swapped:?}");
        }
        // A key that was not kept is verified by jsonwebtoken's own verifier, and stays out of the list.
        let token = jsonwebtoken::encode(&Header::new(Algorithm::RS256), &claims, &other_enc).unwrap();
        assert!(check(Algorithm::RS256, &token, &other));
        let DecodingKeyKind::RsaModulusExponent { n, e } = other.kind() else { unreachable!() };
        assert!(cached(Algorithm::RS256, n, e).is_none(), "a key nobody kept entered the list");
        // Through jsonwebtoken itself, with the same outcome.
        let token = jsonwebtoken::encode(&Header::new(Algorithm::RS256), &claims, &enc).unwrap();
        let mut v = Validation::new(Algorithm::RS256);
        v.validate_aud = false;
        assert!(jsonwebtoken::decode::<Value>(&token, &dec, &v).is_ok());
        assert!(jsonwebtoken::decode::<Value>(&token, &other, &v).is_err());
    }

    #[test]
    fn small_rsa_keys_are_refused_and_other_families_passed_on() {
        // A 1024-bit modulus: outside the 2048..=8192 bits jsonwebtoken's provider accepts.
        let small = DecodingKey::from_rsa_raw_components(&[0xc5u8; 128], &[1, 0, 1]);
        // Kept or not (the size is checked at each verification), it verifies nothing.
        keep(&small, &[Algorithm::RS256]);
        let verified =
            verifier(&Algorithm::RS256, &small).is_ok_and(|v| v.verify(b"x.y", &vec![7u8; 128]).is_ok());
        assert!(!verified);
        // Not RSA: jsonwebtoken's own verifiers.
        let ec = DecodingKey::from_ec_components(
            "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU",
            "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0",
        )
        .unwrap();
        assert_eq!(verifier(&Algorithm::ES256, &ec).unwrap().algorithm(), Algorithm::ES256);
    }
}
