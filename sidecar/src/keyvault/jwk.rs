//! A Key Vault key's public half (JSON Web Key) as a PEM `PUBLIC KEY` (SubjectPublicKeyInfo),
//! the form the CSI driver's Azure provider writes for `objectType: key`.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use der::Encode;
use der::asn1::{BitString, ObjectIdentifier};
use rsa::pkcs8::EncodePublicKey;
use spki::{AlgorithmIdentifierOwned, SubjectPublicKeyInfoOwned};

use crate::deliver::convert::pem_block;

const EC_PUBLIC_KEY: &str = "1.2.840.10045.2.1";

/// The JWK fields a public key needs.
#[derive(Debug, serde::Deserialize)]
pub struct Jwk {
    /// `{vault}/keys/{name}/{version}`.
    #[serde(default)]
    pub kid: Option<String>,
    pub kty: String,
    pub n: Option<String>,
    pub e: Option<String>,
    pub crv: Option<String>,
    pub x: Option<String>,
    pub y: Option<String>,
}

pub fn public_pem(jwk: &Jwk) -> Result<Vec<u8>, String> {
    let b64 = |field: &Option<String>, name: &str| -> Result<Vec<u8>, String> {
        let v = field
            .as_deref()
            .ok_or_else(|| format!("the key has no {name}"))?;
        URL_SAFE_NO_PAD
            .decode(v.trim_end_matches('='))
            .map_err(|e| format!("the key's {name} is not base64url: {e}"))
    };
    match jwk.kty.as_str() {
        "RSA" | "RSA-HSM" => {
            let n = rsa::BigUint::from_bytes_be(&b64(&jwk.n, "n")?);
            let e = rsa::BigUint::from_bytes_be(&b64(&jwk.e, "e")?);
            let key =
                rsa::RsaPublicKey::new(n, e).map_err(|e| format!("not a valid RSA key: {e}"))?;
            let der = key.to_public_key_der().map_err(|e| e.to_string())?;
            Ok(pem_block("PUBLIC KEY", der.as_bytes()))
        }
        "EC" | "EC-HSM" => {
            let crv = jwk.crv.as_deref().ok_or("the EC key has no crv")?;
            let (curve, len) = match crv {
                "P-256" => ("1.2.840.10045.3.1.7", 32),
                "P-384" => ("1.3.132.0.34", 48),
                "P-521" => ("1.3.132.0.35", 66),
                other => {
                    return Err(format!(
                        "EC curve {other:?} is not supported (P-256, P-384, P-521)"
                    ));
                }
            };
            let (x, y) = (b64(&jwk.x, "x")?, b64(&jwk.y, "y")?);
            if x.len() > len || y.len() > len {
                return Err(format!(
                    "the {crv} key's coordinates are longer than {len} bytes"
                ));
            }
            // Uncompressed point: 0x04 | x | y, each left-padded to the field size.
            let mut point = vec![4u8];
            for c in [&x, &y] {
                point.extend(std::iter::repeat_n(0u8, len - c.len()));
                point.extend_from_slice(c);
            }
            let oid = |s: &str| ObjectIdentifier::new(s).map_err(|e| e.to_string());
            let spki = SubjectPublicKeyInfoOwned {
                algorithm: AlgorithmIdentifierOwned {
                    oid: oid(EC_PUBLIC_KEY)?,
                    parameters: Some(oid(curve)?.into()),
                },
                subject_public_key: BitString::from_bytes(&point).map_err(|e| e.to_string())?,
            };
            let der = spki.to_der().map_err(|e| e.to_string())?;
            Ok(pem_block("PUBLIC KEY", &der))
        }
        other => Err(format!(
            "key type {other:?} has no public key to deliver (RSA or EC expected)"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rsa_and_ec_keys_become_spki_pem() {
        let private = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, 1024).unwrap();
        let public = rsa::RsaPublicKey::from(&private);
        use rsa::traits::PublicKeyParts;
        let jwk = Jwk {
            kid: None,
            kty: "RSA".into(),
            n: Some(URL_SAFE_NO_PAD.encode(public.n().to_bytes_be())),
            e: Some(URL_SAFE_NO_PAD.encode(public.e().to_bytes_be())),
            crv: None,
            x: None,
            y: None,
        };
        let pem = String::from_utf8(public_pem(&jwk).unwrap()).unwrap();
        assert_eq!(
            pem,
            public
                .to_public_key_pem(rsa::pkcs8::LineEnding::LF)
                .unwrap()
        );
        // P-256 generator point: a valid public key.
        let x = "6B17D1F2E12C4247F8BCE6E563A440F277037D812DEB33A0F4A13945D898C296";
        let y = "4FE342E2FE1A7F9B8EE7EB4A7C0F9E162BCE33576B315ECECBB6406837BF51F5";
        let hexd = |h: &str| {
            (0..h.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&h[i..i + 2], 16).unwrap())
                .collect::<Vec<u8>>()
        };
        let ec = Jwk {
            kid: None,
            kty: "EC".into(),
            n: None,
            e: None,
            crv: Some("P-256".into()),
            x: Some(URL_SAFE_NO_PAD.encode(hexd(x))),
            y: Some(URL_SAFE_NO_PAD.encode(hexd(y))),
        };
        let pem = String::from_utf8(public_pem(&ec).unwrap()).unwrap();
        assert!(pem.starts_with("-----BEGIN PUBLIC KEY-----\n"));
        // SPKI of a P-256 key is 91 bytes: 124 base64 characters.
        let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
        assert_eq!(body.len(), 124);
        assert!(
            public_pem(&Jwk {
                kid: None,
                kty: "oct".into(),
                n: None,
                e: None,
                crv: None,
                x: None,
                y: None
            })
            .is_err()
        );
        assert!(
            public_pem(&Jwk {
                crv: Some("P-999".into()),
                ..ec
            })
            .is_err()
        );
    }
}
