//! The crypto provider jsonwebtoken runs on: its own aws-lc-rs provider, except that RSA public keys are
//! parsed once. jsonwebtoken hands the verifier factory a `DecodingKey` for every token, and its provider
//! builds the RSA key (and, at its first signature, its Montgomery constants) from `n` and `e` each time:
//! about a fifth of an RS256 check. This provider keeps each parsed key, by algorithm, `n` and `e`, and
//! verifies with it. Parsing, claims and every other algorithm stay jsonwebtoken's, on aws-lc-rs; the
//! signature check is aws-lc-rs's.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock};

use arc_swap::ArcSwap;
use aws_lc_rs::signature::{self as sig, ParsedPublicKey, RsaParameters, RsaPublicKeyComponents};
use jsonwebtoken::crypto::{CryptoProvider, JwkUtils, JwtVerifier, aws_lc};
use jsonwebtoken::errors::{Error, ErrorKind};
use jsonwebtoken::signature::{self, Verifier};
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey, DecodingKeyKind};

pub static PROVIDER: CryptoProvider = CryptoProvider {
    signer_factory: |alg, key| (aws_lc::DEFAULT_PROVIDER.signer_factory)(alg, key),
    verifier_factory: verifier,
    jwk_utils: JwkUtils {
        extract_rsa_public_key_components: |der| {
            (aws_lc::DEFAULT_PROVIDER.jwk_utils.extract_rsa_public_key_components)(der)
        },
        extract_ec_public_key_coordinates: |der, alg| {
            (aws_lc::DEFAULT_PROVIDER.jwk_utils.extract_ec_public_key_coordinates)(der, alg)
        },
        compute_digest: |data, hash| (aws_lc::DEFAULT_PROVIDER.jwk_utils.compute_digest)(data, hash),
    },
};

/// Makes [`PROVIDER`] jsonwebtoken's provider for this process. It has to come before jsonwebtoken's
/// first use, which otherwise settles on its default (correct, only slower); later calls do nothing.
pub fn install() {
    let _ = PROVIDER.install_default();
}

/// What the key set keeps in the cache: a few keys per issuer. Past this (an issuer rotating keys very
/// often), the cache starts again empty rather than grow.
const MAX_KEYS: usize = 256;

type KeyId = (Algorithm, Vec<u8>, Vec<u8>);

static PARSED: LazyLock<ArcSwap<HashMap<KeyId, Arc<ParsedPublicKey>>>> = LazyLock::new(Default::default);

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
    let (Some(params), DecodingKeyKind::RsaModulusExponent { n, e }) = (rsa_parameters(*alg), key.kind())
    else {
        return (aws_lc::DEFAULT_PROVIDER.verifier_factory)(alg, key);
    };
    if key.family() != AlgorithmFamily::Rsa {
        return Err(ErrorKind::InvalidKeyFormat.into());
    }
    let id = (*alg, n.clone(), e.clone());
    let parsed = match PARSED.load().get(&id) {
        Some(k) => k.clone(),
        None => {
            let parsed = Arc::new(
                RsaPublicKeyComponents { n: &n[..], e: &e[..] }
                    .to_parsed_public_key(params)
                    .map_err(|e| ErrorKind::InvalidRsaKey(e.to_string()))?,
            );
            PARSED.rcu(|map| {
                let mut map = if map.len() >= MAX_KEYS { HashMap::new() } else { HashMap::clone(map) };
                map.insert(id.clone(), parsed.clone());
                map
            });
            parsed
        }
    };
    Ok(Box::new(ParsedRsa { alg: *alg, key: parsed }))
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
        let (_, other) = rsa_key();
        let claims = json!({"sub": "a", "exp": 4_000_000_000u64});
        for alg in [Algorithm::RS256, Algorithm::RS384, Algorithm::RS512, Algorithm::PS256, Algorithm::PS512]
        {
            let token = jsonwebtoken::encode(&Header::new(alg), &claims, &enc).unwrap();
            // Twice: the first parses the key, the second takes it from the cache.
            assert!(check(alg, &token, &dec), "{alg:?}");
            assert!(check(alg, &token, &dec), "{alg:?} (cached key)");
            let DecodingKeyKind::RsaModulusExponent { n, e } = dec.kind() else { unreachable!() };
            assert!(PARSED.load().contains_key(&(alg, n.clone(), e.clone())), "{alg:?} key not kept");
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
