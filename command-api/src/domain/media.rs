//! Which media types an upload may declare, the kind (and so the size limit) each belongs to,
//! and whether the upload's first bytes agree with the declared type. Pure: the HTTP layer
//! reads the bytes, this decides.

/// A kind of attachment; each has its own size limit (`PARLEY_ATTACHMENT_MAX_<KIND>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MediaKind {
    Image,
    Audio,
    Video,
    Document,
}

/// How many leading bytes [`agrees`] needs at most (fewer when the upload is shorter).
pub const SNIFF_LEN: usize = 512;

/// The byte signatures Parley recognises.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Signature {
    Png,
    Jpeg,
    Gif,
    Webp,
    Mp3,
    Ogg,
    Wav,
    Webm,
    /// ISO base media (mp4, m4a, mov): `ftyp` at offset 4.
    IsoMedia,
    Pdf,
    Zip,
    /// UTF-8 text with no NUL and no binary signature above.
    Text,
}

/// Every allowed media type (lowercase essence, no parameters), its kind, and the signature
/// its bytes must carry.
const ALLOWED: &[(&str, MediaKind, Signature)] = &[
    ("image/png", MediaKind::Image, Signature::Png),
    ("image/jpeg", MediaKind::Image, Signature::Jpeg),
    ("image/gif", MediaKind::Image, Signature::Gif),
    ("image/webp", MediaKind::Image, Signature::Webp),
    ("audio/mpeg", MediaKind::Audio, Signature::Mp3),
    ("audio/ogg", MediaKind::Audio, Signature::Ogg),
    ("audio/wav", MediaKind::Audio, Signature::Wav),
    ("audio/webm", MediaKind::Audio, Signature::Webm),
    ("audio/mp4", MediaKind::Audio, Signature::IsoMedia),
    ("video/mp4", MediaKind::Video, Signature::IsoMedia),
    ("video/quicktime", MediaKind::Video, Signature::IsoMedia),
    ("video/webm", MediaKind::Video, Signature::Webm),
    ("video/ogg", MediaKind::Video, Signature::Ogg),
    ("application/pdf", MediaKind::Document, Signature::Pdf),
    ("application/zip", MediaKind::Document, Signature::Zip),
    ("text/plain", MediaKind::Document, Signature::Text),
    ("text/csv", MediaKind::Document, Signature::Text),
    ("text/markdown", MediaKind::Document, Signature::Text),
];

/// A declared media type that is on the allowlist.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MediaType {
    essence: &'static str,
    kind: MediaKind,
    signature: Signature,
}

impl MediaType {
    /// Parses a `Content-Type` header value: the essence (before any `;` parameter),
    /// case-insensitive, must be on the allowlist. `None` otherwise (a 415).
    pub fn parse(content_type: &str) -> Option<Self> {
        let essence = content_type
            .split(';')
            .next()
            .unwrap_or_default()
            .trim()
            .to_ascii_lowercase();
        ALLOWED
            .iter()
            .find(|(name, ..)| *name == essence)
            .map(|&(essence, kind, signature)| Self {
                essence,
                kind,
                signature,
            })
    }

    /// Lowercase, without parameters: what is stored and served back.
    pub fn essence(&self) -> &'static str {
        self.essence
    }

    pub fn kind(&self) -> MediaKind {
        self.kind
    }

    /// Whether `prefix` (the first [`SNIFF_LEN`] bytes, or the whole upload if shorter) looks
    /// like this type. A type that claims to be an image must start like one, so a client
    /// cannot smuggle, say, a PDF past an image limit or into an `<img>`.
    pub fn agrees(&self, prefix: &[u8]) -> bool {
        match self.signature {
            Signature::Text => is_text(prefix) && binary_signature(prefix).is_none(),
            s => binary_signature(prefix) == Some(s),
        }
    }

    /// Every allowed type, for the docs.
    pub fn allowed() -> impl Iterator<Item = &'static str> {
        ALLOWED.iter().map(|(name, ..)| *name)
    }
}

fn binary_signature(b: &[u8]) -> Option<Signature> {
    let at = |offset: usize, magic: &[u8]| b.get(offset..offset + magic.len()) == Some(magic);
    Some(if at(0, b"\x89PNG\r\n\x1a\n") {
        Signature::Png
    } else if at(0, b"\xff\xd8\xff") {
        Signature::Jpeg
    } else if at(0, b"GIF87a") || at(0, b"GIF89a") {
        Signature::Gif
    } else if at(0, b"RIFF") && at(8, b"WEBP") {
        Signature::Webp
    } else if at(0, b"RIFF") && at(8, b"WAVE") {
        Signature::Wav
    } else if at(0, b"ID3") || (b.len() >= 2 && b[0] == 0xff && b[1] & 0xe0 == 0xe0) {
        Signature::Mp3
    } else if at(0, b"OggS") {
        Signature::Ogg
    } else if at(0, b"\x1a\x45\xdf\xa3") {
        Signature::Webm
    } else if at(4, b"ftyp") {
        Signature::IsoMedia
    } else if at(0, b"%PDF-") {
        Signature::Pdf
    } else if at(0, b"PK\x03\x04") {
        Signature::Zip
    } else {
        return None;
    })
}

/// UTF-8 with no NUL; the prefix may end inside a character (it was cut at [`SNIFF_LEN`]).
fn is_text(b: &[u8]) -> bool {
    let valid = match std::str::from_utf8(b) {
        Ok(_) => true,
        Err(e) => e.error_len().is_none(),
    };
    valid && !b.contains(&0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PNG: &[u8] = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR";
    const PDF: &[u8] = b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n";

    #[test]
    fn a_declared_type_is_matched_by_its_essence_case_insensitively() {
        let t = MediaType::parse("Text/Plain; charset=utf-8").unwrap();
        assert_eq!(t.essence(), "text/plain");
        assert_eq!(t.kind(), MediaKind::Document);
        assert_eq!(
            MediaType::parse("video/mp4").map(|t| t.kind()),
            Some(MediaKind::Video)
        );
    }

    #[test]
    fn types_off_the_allowlist_are_refused() {
        for t in [
            "",
            "application/octet-stream",
            "text/html",
            "image/svg+xml",
            "image",
        ] {
            assert_eq!(MediaType::parse(t), None, "{t}");
        }
    }

    #[test]
    fn png_bytes_agree_with_image_png_and_nothing_else() {
        let png = MediaType::parse("image/png").unwrap();
        assert!(png.agrees(PNG));
        assert!(!MediaType::parse("image/jpeg").unwrap().agrees(PNG));
        assert!(!MediaType::parse("text/plain").unwrap().agrees(PNG));
    }

    #[test]
    fn a_pdf_or_text_declared_as_png_disagrees() {
        let png = MediaType::parse("image/png").unwrap();
        assert!(!png.agrees(PDF));
        assert!(!png.agrees(b"just some words"));
        assert!(MediaType::parse("application/pdf").unwrap().agrees(PDF));
    }

    #[test]
    fn text_must_be_utf8_without_nul_and_may_be_cut_inside_a_character() {
        let text = MediaType::parse("text/plain").unwrap();
        assert!(text.agrees("héllo wörld".as_bytes()));
        assert!(text.agrees(&"é".as_bytes()[..1]));
        assert!(!text.agrees(b"a\0b"));
        assert!(!text.agrees(b"\xff\xfe bad"));
        assert!(!text.agrees(PDF));
    }

    #[test]
    fn iso_media_is_accepted_as_audio_or_video_mp4() {
        let mp4 = b"\0\0\0\x18ftypmp42\0\0\0\0";
        assert!(MediaType::parse("video/mp4").unwrap().agrees(mp4));
        assert!(MediaType::parse("audio/mp4").unwrap().agrees(mp4));
        assert!(!MediaType::parse("video/webm").unwrap().agrees(mp4));
    }
}
