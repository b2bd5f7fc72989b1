//! Wavelet filters for WaveFT's inverse transform, exactly as PEFT's `tuners/waveft/wavelet.py` builds them.
//!
//! PEFT keeps one list of reconstruction low-pass coefficients per wavelet (values from PyWavelets) and
//! derives the others: `rec_lo = c` (times √2 for the coiflets), `rec_hi[i] = (-1)^i · rec_lo[F-1-i]`.
//! Only `rec_lo` and `rec_hi` enter `waverec2d`. The table below holds PEFT's numbers as f64 (the values
//! Python parses; generated with `repr(float)`), including two upstream quirks that we reproduce on
//! purpose so merged weights match PEFT: `coif4` is not the textbook coif4 (its coefficients sum to
//! 1.024 instead of 1) and `coif5` has 48 taps, which makes PEFT's reconstruction smaller than the layer
//! (PEFT then crops to an empty ΔW); `coif5` is therefore rejected here with an explanation.
//!
//! `WAVELET_REDUCTIONS` in PEFT (`constants.py`) also lists db11-db38, sym11-sym20 and coif6-coif17, but
//! the `Wavelet` class has no coefficients for them and PEFT fails when it builds the layer; they are
//! rejected here as well.

use crate::error::{Error, Result};
use std::f64::consts::FRAC_1_SQRT_2;

/// `(name, reconstruction low-pass coefficients before the coiflet √2 scaling)`.
const COEFFS: &[(&str, &[f64])] = &[
    ("db1", &[FRAC_1_SQRT_2, FRAC_1_SQRT_2]), // PEFT: 0.7071067811865476 (the same f64)
    (
        "db2",
        &[
            0.48296291314453416,
            0.8365163037378079,
            0.2241438680420134,
            -0.12940952255126037,
        ],
    ),
    (
        "db3",
        &[
            0.33267055295008263,
            0.8068915093133388,
            0.4598775021193313,
            -0.13501102001039084,
            -0.08544127388224149,
            0.035226291882100656,
        ],
    ),
    (
        "db4",
        &[
            0.2303778133088965,
            0.7148465705529157,
            0.6308807679298589,
            -0.027983769416859854,
            -0.18703481171909309,
            0.030841381835560764,
            0.0328830116668852,
            -0.010597401785069032,
        ],
    ),
    (
        "db5",
        &[
            0.16010239797419293,
            0.6038292697971896,
            0.7243085284377729,
            0.13842814590132074,
            -0.24229488706638203,
            -0.032244869584638375,
            0.07757149384004572,
            -0.006241490212798274,
            -0.012580751999081999,
            0.0033357252854737712,
        ],
    ),
    (
        "db6",
        &[
            0.11154074335010947,
            0.49462389039845306,
            0.7511339080210954,
            0.31525035170919763,
            -0.22626469396543983,
            -0.12976686756726194,
            0.09750160558732304,
            0.027522865530305727,
            -0.03158203931748603,
            0.0005538422011614961,
            0.004777257510945511,
            -0.0010773010853084796,
        ],
    ),
    (
        "db7",
        &[
            0.07785205408500918,
            0.3965393194819173,
            0.7291320908462351,
            0.4697822874051931,
            -0.14390600392856498,
            -0.22403618499387498,
            0.07130921926683026,
            0.08061260915108308,
            -0.03802993693501441,
            -0.01657454163066688,
            0.01255099855609984,
            0.0004295779729213665,
            -0.0018016407040474908,
            0.00035371379997452024,
        ],
    ),
    (
        "db8",
        &[
            0.05441584224310401,
            0.31287159091429995,
            0.6756307362972898,
            0.5853546836542067,
            -0.015829105256349306,
            -0.2840155429615469,
            0.0004724845739132828,
            0.12874742662047847,
            -0.017369301001807547,
            -0.044088253930794755,
            0.013981027917398282,
            0.008746094047405777,
            -0.004870352993451574,
            -0.00039174037337694705,
            0.0006754494064505693,
            -0.00011747678412476953,
        ],
    ),
    (
        "db9",
        &[
            0.038077947363878345,
            0.24383467461259034,
            0.6048231236901112,
            0.6572880780513005,
            0.13319738582500756,
            -0.2932737832791749,
            -0.09684078322297646,
            0.14854074933810638,
            0.03072568147933338,
            -0.06763282906132997,
            0.00025094711483145197,
            0.022361662123679096,
            -0.004723204757751397,
            -0.00428150368246343,
            0.0018476468830562265,
            0.00023038576352319597,
            -0.0002519631889427101,
            3.93473203162716e-05,
        ],
    ),
    (
        "db10",
        &[
            0.026670057900555554,
            0.1881768000776915,
            0.5272011889317256,
            0.6884590394536035,
            0.2811723436605775,
            -0.24984642432731538,
            -0.19594627437737705,
            0.12736934033579325,
            0.09305736460357235,
            -0.07139414716639708,
            -0.029457536821875813,
            0.033212674059341,
            0.0036065535669561697,
            -0.010733175483330575,
            0.001395351747052901,
            0.001992405295185056,
            -0.0006858566949597116,
            -0.00011646685512928545,
            9.358867032006959e-05,
            -1.3264202894521244e-05,
        ],
    ),
    (
        "sym2",
        &[
            0.48296291314469025,
            0.836516303737469,
            0.22414386804185735,
            -0.12940952255092145,
        ],
    ),
    (
        "sym3",
        &[
            0.3326705529509569,
            0.8068915093133388,
            0.4598775021193313,
            -0.13501102001039084,
            -0.08544127388224149,
            0.035226291882100656,
        ],
    ),
    (
        "sym4",
        &[
            0.0322231006040427,
            -0.012603967262037833,
            -0.09921954357684722,
            0.29785779560527736,
            0.8037387518059161,
            0.49761866763201545,
            -0.02963552764599851,
            -0.07576571478927333,
        ],
    ),
    (
        "sym5",
        &[
            0.019538882735286728,
            -0.021101834024758855,
            -0.17532808990845047,
            0.01660210576452232,
            0.6339789634582119,
            0.7234076904024206,
            0.1993975339773936,
            -0.039134249302383094,
            0.029519490925774643,
            0.027333068345077982,
        ],
    ),
    (
        "sym6",
        &[
            -0.007800708325034148,
            0.0017677118642428036,
            0.04472490177066578,
            -0.021060292512300564,
            -0.07263752278646252,
            0.3379294217276218,
            0.787641141030194,
            0.4910559419267466,
            -0.048311742585633,
            -0.11799011114819057,
            0.0034907120842174702,
            0.015404109327027373,
        ],
    ),
    (
        "sym7",
        &[
            0.010268176708511255,
            0.004010244871533663,
            -0.10780823770381774,
            -0.14004724044296152,
            0.2886296317515146,
            0.767764317003164,
            0.5361019170917628,
            0.017441255086855827,
            -0.049552834937127255,
            0.0678926935013727,
            0.03051551316596357,
            -0.01263630340325193,
            -0.0010473848886829163,
            0.002681814568257878,
        ],
    ),
    (
        "sym8",
        &[
            0.0018899503327594609,
            -0.0003029205147213668,
            -0.01495225833704823,
            0.003808752013890615,
            0.049137179673607506,
            -0.027219029917056003,
            -0.05194583810770904,
            0.3644418948353314,
            0.7771857517005235,
            0.4813596512583722,
            -0.061273359067658524,
            -0.1432942383508097,
            0.007607487324917605,
            0.03169508781149298,
            -0.0005421323317911481,
            -0.0033824159510061256,
        ],
    ),
    (
        "sym9",
        &[
            0.0010694900329086053,
            -0.0004731544986800831,
            -0.010264064027633142,
            0.008859267493400484,
            0.06207778930288603,
            -0.018233770779395985,
            -0.19155083129728512,
            0.035272488035271894,
            0.6173384491409358,
            0.717897082764412,
            0.238760914607303,
            -0.05456895843083407,
            0.0005834627461258068,
            0.03022487885827568,
            -0.01152821020767923,
            -0.013271967781817119,
            0.0006197808889855868,
            0.0014009155259146807,
        ],
    ),
    (
        "sym10",
        &[
            -0.0004593294210046588,
            5.7036083618494284e-05,
            0.004593173585311828,
            -0.0008043589320165449,
            -0.02035493981231129,
            0.005764912033581909,
            0.04999497207737669,
            -0.0319900568824278,
            -0.03553674047381755,
            0.38382676106708546,
            0.7695100370211071,
            0.47169066693843925,
            -0.07088053578324385,
            -0.15949427888491757,
            0.011609893903711381,
            0.0459272392310922,
            -0.0014653825813050513,
            -0.008641299277022422,
            9.563267072289475e-05,
            0.0007701598091144901,
        ],
    ),
    (
        "coif1",
        &[
            -0.05142972847076845,
            0.23892972847076846,
            0.6028594569415369,
            0.2721405430584631,
            -0.05142972847076845,
            -0.011070271529231544,
        ],
    ),
    (
        "coif2",
        &[
            0.011587596738716868,
            -0.029320137983468563,
            -0.04763959031100813,
            0.2730210465347666,
            0.5746823938568638,
            0.2948671936956192,
            -0.05408560709171143,
            -0.042026480460771606,
            0.016744410163279506,
            0.003967883612962012,
            -0.0012892033561406595,
            -0.0005095053991076441,
        ],
    ),
    (
        "coif3",
        &[
            -0.0026824186709220686,
            0.005503126707831385,
            0.016583560479170346,
            -0.046507764478726975,
            -0.043220763560211914,
            0.28650333527364746,
            0.56128525687033,
            0.30298357177282415,
            -0.050770140754888865,
            -0.05819625076158553,
            0.024434094321166958,
            0.011229240962037866,
            -0.006369601011048823,
            -0.0018204589155662422,
            0.0007902051009575939,
            0.000329665173793183,
            -5.019277455327665e-05,
            -2.4465734255308132e-05,
        ],
    ),
    (
        "coif4",
        &[
            0.0006309612114309468,
            -0.0011522251437699736,
            -0.005194525163470323,
            0.01136093089978195,
            0.01894506104561664,
            -0.05171984370581528,
            -0.03448614047094481,
            0.30227251053656845,
            0.5545479062408811,
            0.30791766802517506,
            -0.0435250092812657,
            -0.064887950971431,
            0.01988077364815952,
            0.017638947871261697,
            -0.007366054847173364,
            -0.002312432307658842,
            0.0014260063442333715,
            0.00046669846355373536,
            -0.0001270007842387334,
            -0.0001130536369789105,
            3.048364879677801e-05,
            1.2667448089330081e-05,
            -1.5849265807568937e-06,
            -1.1239480882815428e-06,
        ],
    ),
    (
        "coif5",
        &[
            -0.0001444992186438191,
            0.00025416494920119467,
            0.0015016192805175522,
            -0.0029411108712655517,
            -0.007177767151487719,
            0.016680426640070654,
            0.019433238433489604,
            -0.0649349465672125,
            -0.03624979308913257,
            0.2980426621780944,
            0.5574916297092007,
            0.3073164452920678,
            -0.04708803471976115,
            -0.06889052250805007,
            0.020697343297747767,
            0.021640668655956857,
            -0.008108937307895367,
            -0.004988173767104185,
            0.002448691432102127,
            0.0014095103899593442,
            -0.0005637801876093826,
            -0.0002859004477225751,
            0.00012739637513815207,
            5.416263410701044e-05,
            -1.7368679443462806e-05,
            -1.3926561900600109e-05,
            3.582065515946049e-06,
            1.9140228958473188e-06,
            -3.12624883770169e-07,
            -3.4030635502511645e-07,
            5.981606523851694e-08,
            4.700142784945649e-08,
            -6.1586157096783646e-09,
            -9.225635096344936e-09,
            1.0284860745188212e-09,
            1.1687341751862637e-09,
            -9.468626176069127e-11,
            -1.6230233142152042e-10,
            1.507665685934695e-11,
            1.5770990416421914e-11,
            -1.084900468648598e-12,
            -1.9686597794118046e-12,
            9.874563463972664e-14,
            1.967347814605081e-13,
            -8.02108014529989e-15,
            -2.1030408801651653e-14,
            7.238886978309157e-16,
            1.9432085150727615e-15,
        ],
    ),
];

/// PEFT's `WAVELET_REDUCTIONS`: rows/cols added before the transform so the output covers the layer.
/// Every family in [`COEFFS`] except coif5 has `reduction = taps - 2`.
const REDUCTIONS: &[(&str, usize)] = &[
    ("db1", 0),
    ("db2", 2),
    ("db3", 4),
    ("db4", 6),
    ("db5", 8),
    ("db6", 10),
    ("db7", 12),
    ("db8", 14),
    ("db9", 16),
    ("db10", 18),
    ("sym2", 2),
    ("sym3", 4),
    ("sym4", 6),
    ("sym5", 8),
    ("sym6", 10),
    ("sym7", 12),
    ("sym8", 14),
    ("sym9", 16),
    ("sym10", 18),
    ("coif1", 4),
    ("coif2", 10),
    ("coif3", 16),
    ("coif4", 22),
    ("coif5", 28),
];

/// The synthesis filters of one wavelet and the geometry PEFT derives from them.
#[derive(Clone, Debug, PartialEq)]
pub struct WaveletFilters {
    /// The family name (`db1`, `sym2`, ...).
    pub name: String,
    /// Reconstruction low-pass filter.
    pub rec_lo: Vec<f64>,
    /// Reconstruction high-pass filter.
    pub rec_hi: Vec<f64>,
    /// Extra rows/cols PEFT pads the coefficient grid with (`WAVELET_REDUCTIONS`).
    pub reduction: usize,
}

/// Names accepted by [`wavelet_filters`] (the ones PEFT can actually build).
pub fn supported_wavelets() -> Vec<&'static str> {
    COEFFS.iter().map(|(n, _)| *n).filter(|n| *n != "coif5").collect()
}

/// The filters of `name` (`db1`..`db10`, `sym2`..`sym10`, `coif1`..`coif4`).
pub fn wavelet_filters(name: &str) -> Result<WaveletFilters> {
    if name == "coif5" {
        return Err(Error::invalid(
            "wavelet_family coif5: PEFT's coif5 table has 48 taps for a reduction of 28, so its inverse \
             transform is 18 rows/cols smaller than the layer and PEFT produces an empty delta weight; \
             not supported",
        ));
    }
    let Some((_, c)) = COEFFS.iter().find(|(n, _)| *n == name) else {
        return Err(Error::invalid(format!(
            "unknown wavelet_family {name:?}: supported are {} (PEFT's validator also accepts db11-db38, \
             sym11-sym20 and coif5-coif17, but PEFT has no filters for them and fails as well)",
            supported_wavelets().join(", ")
        )));
    };
    let reduction = REDUCTIONS
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, r)| *r)
        .ok_or_else(|| Error::invalid(format!("wavelet_family {name:?} has no reduction entry")))?;
    let scale = if name.starts_with("coif") {
        std::f64::consts::SQRT_2
    } else {
        1.0
    };
    let rec_lo: Vec<f64> = c.iter().map(|x| x * scale).collect();
    let f = rec_lo.len();
    let rec_hi = (0..f)
        .map(|i| {
            if i % 2 == 0 {
                rec_lo[f - 1 - i]
            } else {
                -rec_lo[f - 1 - i]
            }
        })
        .collect();
    Ok(WaveletFilters {
        name: name.to_string(),
        rec_lo,
        rec_hi,
        reduction,
    })
}

/// Geometry of PEFT's `get_delta_weight` along one axis (rows or columns) of a layer dimension `dim`:
/// coefficients at original index `i` sit at `i + offset` in a padded grid of `padded` (even) entries,
/// whose halves `[0, half)` and `[half, padded)` are the low- and high-pass bands; the transposed
/// convolution writes output index `2·(p mod half) + tap`, and ΔW's index is that minus `skip`
/// (`waverec2d`'s boundary crop plus the final centre crop).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AxisGeometry {
    pub padded: usize,
    pub half: usize,
    pub offset: usize,
    pub skip: usize,
}

impl AxisGeometry {
    /// The geometry for one axis of length `dim` with `taps`-long filters and PEFT's `reduction`.
    pub fn new(dim: usize, taps: usize, reduction: usize) -> Result<AxisGeometry> {
        let mut padded = dim + reduction;
        if !padded.is_multiple_of(2) {
            padded += 1;
        }
        let half = padded / 2;
        let offset = (padded - dim) / 2;
        // conv_transpose2d with stride 2: (half - 1)·2 + taps outputs; waverec2d crops (2·taps - 3) / 2
        // from each side (when positive); PEFT then centre-crops to `dim`.
        let full = 2 * half + taps - 2;
        let pad = (2 * taps).saturating_sub(3) / 2;
        let cropped = full.saturating_sub(2 * pad);
        if cropped < dim {
            return Err(Error::invalid(format!(
                "wavelet reconstruction of {cropped} entries cannot cover a dimension of {dim} \
                 ({taps} taps, reduction {reduction})"
            )));
        }
        let start = (cropped - dim) / 2;
        Ok(AxisGeometry {
            padded,
            half,
            offset,
            skip: pad + start,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_are_orthonormal_where_peft_is() {
        for name in supported_wavelets() {
            let f = wavelet_filters(name).unwrap();
            assert_eq!(f.rec_lo.len(), f.rec_hi.len());
            // Every supported family except PEFT's odd coif4 has reduction = taps - 2.
            assert_eq!(f.reduction + 2, f.rec_lo.len(), "{name}");
            if name != "coif4" {
                let s: f64 = f.rec_lo.iter().sum();
                let e: f64 = f.rec_lo.iter().map(|x| x * x).sum();
                assert!((s - std::f64::consts::SQRT_2).abs() < 1e-9, "{name}: sum {s}");
                assert!((e - 1.0).abs() < 1e-9, "{name}: energy {e}");
            }
        }
        assert!(wavelet_filters("coif5").is_err());
        assert!(wavelet_filters("haar").is_err());
        assert!(wavelet_filters("db11").is_err());
    }

    #[test]
    fn haar_geometry() {
        // db1: no reduction, odd dims padded by one at the end, nothing cropped at the start.
        let g = AxisGeometry::new(15, 2, 0).unwrap();
        assert_eq!(
            g,
            AxisGeometry {
                padded: 16,
                half: 8,
                offset: 0,
                skip: 0
            }
        );
        let g = AxisGeometry::new(20, 4, 2).unwrap();
        assert_eq!(
            g,
            AxisGeometry {
                padded: 22,
                half: 11,
                offset: 1,
                skip: 2
            }
        );
        assert!(AxisGeometry::new(20, 48, 28).is_err());
    }
}
