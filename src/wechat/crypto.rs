//! WeChat's message crypto: SHA-1 signatures and the AES-256-CBC envelope of safe mode.
//!
//! Plaintext = 16 random bytes ‖ 4-byte big-endian length ‖ xml ‖ appid, PKCS#7-padded to a
//! **32-byte** block (not AES's 16: a 16-byte unpadder rejects valid messages). The key is
//! base64(EncodingAESKey + "="), the IV its first 16 bytes.

use aes::Aes256;
use base64::Engine;
use base64::alphabet;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig, STANDARD};
use cbc::cipher::block_padding::NoPadding;
use cbc::cipher::{BlockModeDecrypt, BlockModeEncrypt, KeyIvInit};
use sha1::{Digest, Sha1};

const PAD_BLOCK: usize = 32;

/// EncodingAESKeys are 43 characters whose last one carries bits past the 32 bytes; the strict
/// default engine refuses them, so the key alone is decoded leniently.
const KEY_BASE64: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_allow_trailing_bits(true),
);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CryptoError {
    #[error("EncodingAESKey must be 43 characters of base64")]
    BadKey,
    #[error("ciphertext is not base64")]
    NotBase64,
    #[error("ciphertext is not a whole number of AES blocks")]
    BadLength,
    #[error("padding is invalid")]
    BadPadding,
    #[error("decrypted message is malformed")]
    BadLayout,
    #[error("message is for another appid")]
    WrongAppid,
}

/// `sha1(sorted(parts).join(""))` in lowercase hex: `signature` with token, timestamp and nonce;
/// `msg_signature` with the ciphertext as a fourth part.
pub fn signature(parts: &[&str]) -> String {
    let mut sorted = parts.to_vec();
    sorted.sort_unstable();
    let digest = Sha1::digest(sorted.concat().as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// Compares a received signature with the expected one in time independent of where they differ.
pub fn signature_matches(received: &str, parts: &[&str]) -> bool {
    let expected = signature(parts);
    let received = received.to_ascii_lowercase();
    received.len() == expected.len()
        && received
            .bytes()
            .zip(expected.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

/// One account's safe-mode envelope.
#[derive(Clone)]
pub struct MessageCrypto {
    key: [u8; 32],
    appid: String,
}

impl std::fmt::Debug for MessageCrypto {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MessageCrypto")
            .field("key", &"[redacted]")
            .field("appid", &self.appid)
            .finish()
    }
}

impl MessageCrypto {
    pub fn new(encoding_aes_key: &str, appid: &str) -> Result<MessageCrypto, CryptoError> {
        if encoding_aes_key.len() != 43 {
            return Err(CryptoError::BadKey);
        }
        let bytes = KEY_BASE64
            .decode(format!("{encoding_aes_key}="))
            .map_err(|_| CryptoError::BadKey)?;
        let key: [u8; 32] = bytes.try_into().map_err(|_| CryptoError::BadKey)?;
        Ok(MessageCrypto {
            key,
            appid: appid.to_string(),
        })
    }

    /// Encrypts `xml` with fresh random bytes in front.
    pub fn encrypt(&self, xml: &str) -> String {
        let random: [u8; 16] = std::array::from_fn(|_| fastrand::u8(..));
        self.encrypt_with(&random, xml)
    }

    /// Encrypts with the given 16 random bytes; for test vectors.
    pub fn encrypt_with(&self, random: &[u8; 16], xml: &str) -> String {
        let mut plain = Vec::with_capacity(20 + xml.len() + self.appid.len() + PAD_BLOCK);
        plain.extend_from_slice(random);
        plain.extend_from_slice(&(xml.len() as u32).to_be_bytes());
        plain.extend_from_slice(xml.as_bytes());
        plain.extend_from_slice(self.appid.as_bytes());
        let pad = PAD_BLOCK - plain.len() % PAD_BLOCK;
        plain.extend(std::iter::repeat_n(pad as u8, pad));
        let len = plain.len();
        let encrypted = cbc::Encryptor::<Aes256>::new(&self.key.into(), &self.iv().into())
            .encrypt_padded::<NoPadding>(&mut plain, len)
            .expect("the buffer is a whole number of blocks");
        STANDARD.encode(encrypted)
    }

    /// Decrypts and checks the appid; returns the xml.
    pub fn decrypt(&self, ciphertext: &str) -> Result<String, CryptoError> {
        let mut bytes = STANDARD
            .decode(ciphertext.trim())
            .map_err(|_| CryptoError::NotBase64)?;
        if bytes.is_empty() || bytes.len() % 16 != 0 {
            return Err(CryptoError::BadLength);
        }
        let plain = cbc::Decryptor::<Aes256>::new(&self.key.into(), &self.iv().into())
            .decrypt_padded::<NoPadding>(&mut bytes)
            .map_err(|_| CryptoError::BadLength)?;
        let pad = *plain.last().ok_or(CryptoError::BadPadding)? as usize;
        if pad == 0 || pad > PAD_BLOCK || pad > plain.len() {
            return Err(CryptoError::BadPadding);
        }
        let content = &plain[..plain.len() - pad];
        if content.len() < 20 {
            return Err(CryptoError::BadLayout);
        }
        let xml_len = u32::from_be_bytes(content[16..20].try_into().expect("4 bytes")) as usize;
        let rest = &content[20..];
        if xml_len > rest.len() {
            return Err(CryptoError::BadLayout);
        }
        let (xml, appid) = rest.split_at(xml_len);
        if appid != self.appid.as_bytes() {
            return Err(CryptoError::WrongAppid);
        }
        String::from_utf8(xml.to_vec()).map_err(|_| CryptoError::BadLayout)
    }

    fn iv(&self) -> [u8; 16] {
        self.key[..16].try_into().expect("16 bytes")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // The public vectors of shared/wechat/NOTES.md.
    const EASYWECHAT_KEY: &str = "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG";
    const EASYWECHAT_ENCRYPT: &str = "rTNFcsut4LfGuAFKEUVVpwcaCOTJzOd9twZdIW910jb3k+iicx2uvhttIZ3Qg9Qgty3BEF2xbOrz6boTfb30dMomcgrkTqdFPwnhqbk+kIQ7rZiwny9D7NUrTgA5kpX3KsZvrXzUZyP2x9YOlxbgm572lmxKvM7HAQQhIQ/p6HBmoY30bGXFK0BtIu1pW9TjhOYrLQoU18nWYjWqDA1ynkmOytpv7QRI1P1+0NoxL0q2zO1DgeSvnE8CZGo/o5Ap/WHK5W2RAsinpzN4/LjPnmB6U01I5XCoJoC0GK/yMZycd2Oh8Nq6+wBkC1U85oy0ktOY4nLvsQMLrourmMGdZHuTbqpeJ8Ao/5PRYJ+WBvRUwPfGKBL2+2IKZF49vAJqkcGWSHGE76ZN2erXeuNazf/o9o3lIE3q739o4c8t9QGPe31GT2Go/rOz1BsrASwvauNulCh+++yz+CQzBIuikA==";

    #[test]
    fn easywechat_vector_decrypts_and_its_msg_signature_matches() {
        let crypto = MessageCrypto::new(EASYWECHAT_KEY, "wxb11529c136998cb6").unwrap();
        assert_eq!(
            crypto.decrypt(EASYWECHAT_ENCRYPT).unwrap(),
            "<xml><URL><![CDATA[http://wechat.laravel.so/server]]></URL><ToUserName><![CDATA[asdasdasd]]></ToUserName><FromUserName><![CDATA[asdasdasdsadasd]]></FromUserName><CreateTime>1234567898</CreateTime><MsgType><![CDATA[text]]></MsgType><Content><![CDATA[hello]]></Content><MsgId>12345</MsgId></xml>"
        );
        let parts = ["pamtest", "1458300676", "260774613", EASYWECHAT_ENCRYPT];
        assert_eq!(
            signature(&parts),
            "4f3ad57b6989f09f4eb392acce4f9e93942ed890"
        );
        assert!(signature_matches(
            "4F3AD57B6989F09F4EB392ACCE4F9E93942ED890",
            &parts
        ));
        assert!(!signature_matches(
            "4f3ad57b6989f09f4eb392acce4f9e93942ed891",
            &parts
        ));
    }

    #[test]
    fn wxjava_vector_encrypts_to_the_known_ciphertext() {
        let crypto = MessageCrypto::new(EASYWECHAT_KEY, "wxb11529c136998cb6").unwrap();
        assert_eq!(
            crypto.encrypt_with(b"aaaabbbbccccdddd", "我是中文abcd123"),
            "jn1L23DB+6ELqJ+6bruv21Y6MD7KeIfP82D6gU39rmkgczbWwt5+3bnyg5K55bgVtVzd832WzZGMhkP72vVOfg=="
        );
    }

    #[test]
    fn wechatpy_vector_echostr_decrypts_and_signs() {
        let echostr = "4ByGGj+sVCYcvGeQYhaKIk1o0pQRNbRjxybjTGblXrBaXlTXeOo1+bXFXDQQb1o6co6Yh9Bv41n7hOchLF6p+Q==";
        let crypto = MessageCrypto::new(
            "kWxPEV2UEDyxWpmPdKC3F4dgPDmOvfKX1HGnEUDS1aR",
            "wx49f0ab532d5d035a",
        )
        .unwrap();
        assert_eq!(crypto.decrypt(echostr).unwrap(), "5927782489442352469");
        assert_eq!(
            signature(&["123456", "1411443780", "437374425", echostr]),
            "dd6b9c95b495b3f7e2901bfbc76c664930ffdb96"
        );
    }

    #[test]
    fn plain_signature_vector() {
        assert_eq!(
            signature(&["test", "1410685589", "test"]),
            "f21891de399b4e33a1a93c9a7b8a8fffb5a443ff"
        );
    }

    #[test]
    fn round_trip_and_refusals() {
        let crypto = MessageCrypto::new(EASYWECHAT_KEY, "wxappid").unwrap();
        for xml in ["", "x", &"长".repeat(100)] {
            assert_eq!(crypto.decrypt(&crypto.encrypt(xml)).unwrap(), xml);
        }
        let other = MessageCrypto::new(EASYWECHAT_KEY, "wxother").unwrap();
        assert_eq!(
            other.decrypt(&crypto.encrypt("<xml/>")),
            Err(CryptoError::WrongAppid)
        );
        let sealed = crypto.encrypt("<xml/>");
        let truncated = crypto.decrypt(&sealed[..sealed.len() - 8]);
        assert!(
            matches!(
                truncated,
                Err(CryptoError::NotBase64 | CryptoError::BadLength)
            ),
            "{truncated:?}"
        );
        assert!(crypto.decrypt("not base64!").is_err());
        assert_eq!(
            MessageCrypto::new("short", "wx").unwrap_err(),
            CryptoError::BadKey
        );
        assert!(!format!("{crypto:?}").contains(EASYWECHAT_KEY));
    }
}

#[cfg(test)]
mod properties {
    use proptest::prelude::*;

    use super::*;

    fn crypto() -> MessageCrypto {
        MessageCrypto::new("abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG", "wxappid").unwrap()
    }

    proptest! {
        #[test]
        fn any_text_is_refused_or_opened_without_panic(text in ".{0,300}") {
            let _ = crypto().decrypt(&text);
        }

        /// Whole blocks of random bytes get past base64 and AES, into the unpadding and layout
        /// checks, where a careless index would panic.
        #[test]
        fn random_whole_blocks_are_refused_without_panic(blocks in proptest::collection::vec(any::<[u8; 16]>(), 1..24)) {
            let bytes: Vec<u8> = blocks.concat();
            prop_assert!(crypto().decrypt(&STANDARD.encode(bytes)).is_err());
        }

        #[test]
        fn what_is_sealed_opens(xml in ".{0,500}") {
            let crypto = crypto();
            prop_assert_eq!(crypto.decrypt(&crypto.encrypt(&xml)).unwrap(), xml);
        }

        /// A plaintext of our choosing ending in every pad byte value 0..=255 (over whole
        /// 16-byte blocks, so also pads longer than the 32-byte block and longer than the text):
        /// only a pad of 1..=32 can open, and nothing panics.
        #[test]
        fn every_pad_byte_value_is_opened_or_refused(
            body in proptest::collection::vec(any::<u8>(), 0..100),
            pad in any::<u8>(),
            blocks_of_pad in 1usize..4,
        ) {
            let mut plain = body;
            let len = (plain.len() / 16 + blocks_of_pad) * 16;
            plain.resize(len, pad);
            match crypto().decrypt(&seal_raw(&plain)) {
                Ok(_) => prop_assert!((1..=32).contains(&pad)),
                Err(e) => {
                    if pad == 0 || pad > 32 {
                        prop_assert_eq!(e, CryptoError::BadPadding);
                    }
                }
            }
        }

        /// A well-formed envelope whose 4-byte length lies opens only when the length is true.
        #[test]
        fn a_lying_length_field_is_refused(
            xml in ".{0,100}",
            random in any::<[u8; 16]>(),
            claimed in prop_oneof![any::<u32>(), 0u32..120],
        ) {
            let true_len = xml.len() as u32;
            let opened = crypto().decrypt(&seal_raw(&envelope(&random, claimed, xml.as_bytes(), b"wxappid")));
            if claimed == true_len {
                prop_assert_eq!(opened, Ok(xml));
            } else {
                prop_assert!(
                    matches!(opened, Err(CryptoError::BadLayout | CryptoError::WrongAppid)),
                    "{:?}", opened
                );
            }
        }

        /// Sealed for one appid, opened by another: always refused as another appid's.
        #[test]
        fn another_appids_message_is_refused(xml in ".{0,100}", appid in "[a-z0-9]{0,20}") {
            prop_assume!(appid != "wxappid");
            let other = MessageCrypto::new("abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG", &appid).unwrap();
            prop_assert_eq!(crypto().decrypt(&other.encrypt(&xml)), Err(CryptoError::WrongAppid));
        }

        /// Bytes that are not UTF-8 where the xml should be are refused, not lossily read.
        #[test]
        fn a_non_utf8_body_is_refused(body in proptest::collection::vec(any::<u8>(), 1..60)) {
            let opened = crypto().decrypt(&seal_raw(&envelope(&[0; 16], body.len() as u32, &body, b"wxappid")));
            match std::str::from_utf8(&body) {
                Ok(text) => prop_assert_eq!(opened, Ok(text.to_string())),
                Err(_) => prop_assert_eq!(opened, Err(CryptoError::BadLayout)),
            }
        }

        /// Text with a character outside base64 (or broken base64 padding) is not base64.
        #[test]
        fn non_base64_is_refused_as_such(
            prefix in "[A-Za-z0-9+/]{0,40}",
            bad in "[^A-Za-z0-9+/=\\s]",
            suffix in "[A-Za-z0-9+/]{0,40}",
        ) {
            prop_assert_eq!(crypto().decrypt(&format!("{prefix}{bad}{suffix}")), Err(CryptoError::NotBase64));
        }

        /// Any key text: 43 base64 characters make a key, anything else is BadKey; no panic.
        #[test]
        fn any_key_text_is_accepted_or_refused(key in prop_oneof![".{0,60}", "[A-Za-z0-9+/]{43}"], appid in ".{0,20}") {
            match MessageCrypto::new(&key, &appid) {
                Ok(c) => {
                    prop_assert_eq!(key.len(), 43);
                    let shown = format!("{c:?}");
                    prop_assert!(!shown.contains(&key), "key in Debug");
                }
                Err(e) => {
                    prop_assert_eq!(&e, &CryptoError::BadKey);
                    prop_assert!(!e.to_string().is_empty());
                }
            }
        }

        /// The signature check with any received text (non-hex, any length, any case,
        /// unicode) and any parts: true exactly when it is the signature, in any ASCII case.
        #[test]
        fn signature_matches_exactly_the_signature(
            received in prop_oneof![".{0,60}", "[0-9a-fA-F]{40}", "[0-9a-f]{39,41}"],
            parts in proptest::collection::vec(".{0,30}", 0..5),
        ) {
            let parts: Vec<&str> = parts.iter().map(String::as_str).collect();
            let expected = signature(&parts);
            prop_assert_eq!(expected.len(), 40);
            prop_assert_eq!(
                signature_matches(&received, &parts),
                received.to_ascii_lowercase() == expected
            );
            prop_assert!(signature_matches(&expected.to_ascii_uppercase(), &parts));
        }
    }

    /// Every refusal reads as a sentence.
    #[test]
    fn every_crypto_error_is_readable() {
        for e in [
            CryptoError::BadKey,
            CryptoError::NotBase64,
            CryptoError::BadLength,
            CryptoError::BadPadding,
            CryptoError::BadLayout,
            CryptoError::WrongAppid,
        ] {
            assert!(e.to_string().len() > 10, "{e:?}");
        }
    }

    /// 16 random bytes ‖ claimed length ‖ body ‖ appid, PKCS#7-padded to 32 bytes.
    fn envelope(random: &[u8; 16], claimed: u32, body: &[u8], appid: &[u8]) -> Vec<u8> {
        let mut plain = random.to_vec();
        plain.extend_from_slice(&claimed.to_be_bytes());
        plain.extend_from_slice(body);
        plain.extend_from_slice(appid);
        let pad = PAD_BLOCK - plain.len() % PAD_BLOCK;
        plain.extend(std::iter::repeat_n(pad as u8, pad));
        plain
    }

    /// Encrypts whole blocks as they are, for plaintexts `encrypt` would never make.
    fn seal_raw(plain: &[u8]) -> String {
        let crypto = crypto();
        let mut buf = plain.to_vec();
        let len = buf.len();
        let sealed = cbc::Encryptor::<Aes256>::new(&crypto.key.into(), &crypto.iv().into())
            .encrypt_padded::<NoPadding>(&mut buf, len)
            .unwrap();
        STANDARD.encode(sealed)
    }
}
